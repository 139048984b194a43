"""`hybrid-run --demo`: the README's main job on a built-in model.

Builds (once, cached in the user's cache dir) a small deepseek2 model quantized to Q4_K_M by
llama.cpp with the test-fixture builder, then measures prompt and generation speed on it.
The weights are random: the text is gibberish, the speed is real (the same code paths as a
full DeepSeek-R1 file: MLA over the latent cache, grouped sigmoid routing, routed experts on
the native CPU engine).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

__all__ = ["DEMO_FTYPE", "cache_dir", "demo_model", "run_demo"]


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

# A plain-text prompt (no chat template: the demo measures speed, not conversation).
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


def run_demo(rt, plan=None, *, max_tokens: int = 64, out=None) -> int:
    """A short warm-up, then one measured generation; prints the text and tok/s."""
    from hybrid.app.chat import _CONTROLS, Generation

    out = out or sys.stdout
    ids = rt.tokenize(PROMPT)
    # first calls pay one-off costs (thread pool start, page faults on the weights, torch's
    # first-run setup); measure after them
    list(Generation(rt, ids[:8], max_tokens=2, temperature=0.0))
    rt.reset()
    gen = Generation(rt, ids, max_tokens=max_tokens, temperature=0.0)
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
