"""Claims the README makes that no other test checked (issue 20, case 7): the environment
variables, huge pages, the plain-line chat reader, native ops on the expert engine's workers,
the load progress bar."""

import io
import re
import subprocess
import sys

import pytest
import torch

import hybrid
from subproc import NEUTRAL_CWD, hybrid_env


def _python(code, **env):
    r = subprocess.run([sys.executable, "-c", code], env=hybrid_env(**env), cwd=NEUTRAL_CWD,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_import_sets_omp_wait_policy_passive_unless_already_set():
    code = "import os, hybrid; print(os.environ['OMP_WAIT_POLICY'])"
    env = hybrid_env()
    env.pop("OMP_WAIT_POLICY", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=NEUTRAL_CWD, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "PASSIVE", r.stderr
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_hybrid_spin_us_sets_how_long_idle_workers_spin():
    code = ("from hybrid.backends.experts import ExpertEngine; "
            "print(ExpertEngine(64, max_tokens=4, max_k=2, threads=2)._eng.spin_us)")
    env = hybrid_env()
    env.pop("HYBRID_SPIN_US", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=NEUTRAL_CWD, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "100", r.stderr   # the default
    assert _python(code, HYBRID_SPIN_US="250") == "250"


@pytest.fixture(scope="module")
def q4(tiny_gguf):
    return tiny_gguf("Q4_K_M")


def test_decode_keeps_the_workers_spinning_longer_than_prefill(q4):
    with hybrid.load(q4, device="cpu", threads=2, ctx=64) as rt:
        eng = rt.loader.workers.engine
        default = eng.spin_us
        rt.decode_logits([5, 6, 7])
        assert eng.spin_us == rt.decode_spin_us == 2000
        rt.logits(list(range(3, 40)))    # a prefill chunk: the default again
        assert eng.spin_us == default


def _advised_bytes() -> int:
    """Bytes of this process's mappings with MADV_HUGEPAGE (smaps VmFlags 'hg')."""
    total = size = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                size = hi - lo
            elif line.startswith("VmFlags") and " hg" in line:
                total += size
    return total


@pytest.mark.parametrize("hugepages", [True, False])
def test_no_hugepages_drops_the_huge_page_request(q4, hugepages):
    """Placed expert copies (numa modes other than off) ask for transparent huge pages unless
    hugepages=False (`--no-hugepages`; tests/test_cli.py checks the flag reaches the loader)."""
    before = _advised_bytes()
    with hybrid.load(q4, device="cpu", threads=2, ctx=16, numa="interleave", copy_progress=False,
                     hugepages=hugepages) as rt:
        experts = sum(t.n_bytes for n, t in rt.gguf.tensors.items() if "_exps." in n)
        advised = _advised_bytes() - before
    if hugepages:
        assert advised >= experts
    else:
        assert advised == 0


def test_plain_line_reader_without_prompt_toolkit(monkeypatch):
    from hybrid.app.chat import make_reader

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setitem(sys.modules, "prompt_toolkit", None)   # not installed
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: (asked.append(prompt), "hello")[1])
    read = make_reader(Tty(), Tty())
    assert read() == "hello" and asked == [">>> "]
    # not a terminal (a pipe): plain lines from stdin, EOFError at its end
    read = make_reader(io.StringIO("first\nsecond\n"), io.StringIO())
    assert [read(), read()] == ["first", "second"]
    with pytest.raises(EOFError):
        read()


def test_native_linears_run_on_the_expert_engines_workers(q4, monkeypatch):
    """One set of workers serves the experts and every native linear of a decode step."""
    from hybrid.backends import native as nat

    real = nat.native()
    engines = []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def matmul(self, *a, **kw):
            engines.append(kw.get("engine"))
            return real.matmul(*a, **kw)

    with hybrid.load(q4, device="cpu", threads=2, ctx=64) as rt:
        eng = rt.loader.workers.engine
        assert eng is not None and eng is rt.loader._engine._eng
        monkeypatch.setattr(nat, "native", lambda: Spy())
        with torch.inference_mode():
            rt.model.lm_head(torch.randn(1, rt.args.dim))
            rt.model.blocks[0].attn.wo(torch.randn(1, rt.args.n_head * rt.args.v_head_dim))
    assert len(engines) == 2 and all(e is eng for e in engines)


def test_load_reports_progress_and_the_cli_draws_a_bar(q4):
    from hybrid.app.cli import _Progress

    seen = []
    with hybrid.load(q4, device="cpu", threads=2, ctx=16, progress=lambda d, n: seen.append((d, n))):
        pass
    n = len(seen)
    assert n >= 3 and seen == [(i + 1, n) for i in range(n)]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    p = _Progress(Tty(), "loading m.gguf")
    p.update(1, 3)
    assert "loading m.gguf [##########" in p._line("|") and "1/3 layers" in p._line("|")
