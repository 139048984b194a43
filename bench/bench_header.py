"""Opening a GGUF header: hybrid's parser vs gguf's GGUFReader on a DeepSeek-R1-sized header
(129,280-token vocabulary, 127,741 merges, 1025 Q4_K tensor entries), as a ratio in one run.

    python bench/bench_header.py [--runs 3]

The speed checks the tests used to assert (`< 1 s`) live here: tests/test_gguf_file.py checks
what the parser returns and that it reads the header only.
"""

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import GGUFValueType as V

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import timed  # noqa: E402

from hybrid.fixtures import encode_kv, write_gguf  # noqa: E402
from hybrid.gguf_file import GGUFFile  # noqa: E402


def r1_sized_header(path: Path) -> Path:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzĠ"
    tokens = ["".join(rng.choices(letters, k=rng.randint(1, 10))) + str(i) for i in range(129280)]
    merges = [f"{t[:2]} {t[2:]}" for t in tokens[:127741]]
    kv = (encode_kv("general.architecture", V.STRING, "deepseek2")
          + encode_kv("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING)
          + encode_kv("tokenizer.ggml.token_type", V.ARRAY, [1] * len(tokens), V.INT32)
          + encode_kv("tokenizer.ggml.merges", V.ARRAY, merges, V.STRING))
    tensors = [(f"blk.{i // 17}.t{i % 17}.weight", int(T.Q4_K), (7168, 2048)) for i in range(1025)]
    return write_gguf(path, kv, 4, tensors, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = r1_sized_header(Path(d) / "r1.gguf")
        ours, theirs = [], []
        for _ in range(a.runs):   # interleaved
            ours.append(timed(lambda: GGUFFile(path).close()))
            theirs.append(timed(lambda: GGUFReader(path)))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"R1-sized header: hybrid {o * 1e3:.0f} ms, gguf.GGUFReader {t * 1e3:.0f} ms "
          f"(medians of {a.runs}): {t / o:.1f}x")


if __name__ == "__main__":
    main()
