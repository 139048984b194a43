"""hybrid-run: one-shot generation (-p, -p - from stdin, no TTY), bad input (missing file,
not a GGUF, unsupported architecture, does not fit, bad flags: one line, non-zero, no
traceback), --dry-run routing, --demo, --help / --version."""

import re
import subprocess
import sys

import pytest
from subproc import NEUTRAL_CWD, hybrid_env

from hybrid import __version__
from hybrid.app.cli import main, model_id



def hybrid_run(*args, stdin=None, timeout=300, env=None):
    e = hybrid_env(**(env or {}))
    e.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "hybrid.app.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=e, cwd=NEUTRAL_CWD)


def assert_one_line_error(r, *needles, code=None):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(lines) == 1 and lines[0].startswith("hybrid-run: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# ----------------------------------------------------------------------------- bad input


def test_missing_file():
    r = hybrid_run("/nonexistent/DeepSeek-R1.gguf")
    assert_one_line_error(r, "/nonexistent/DeepSeek-R1.gguf", "no such file", code=2)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is a text file, not a model\n")
    r = hybrid_run(p, "-p", "hi")
    assert_one_line_error(r, str(p), "not a GGUF file", code=2)


def test_unsupported_architecture(tmp_path):
    from gguf import GGUFValueType as VT

    from hybrid.fixtures import encode_kv, write_gguf

    kv = [encode_kv("general.architecture", VT.STRING, "mamba"), encode_kv("mamba.block_count", VT.UINT32, 1)]
    p = write_gguf(tmp_path / "mamba.gguf", b"".join(kv), len(kv), [], None)
    r = hybrid_run(p, "--serve")
    assert_one_line_error(r, "'mamba' is not supported", "deepseek2", "qwen3moe", "glm4moe", code=2)


def test_a_model_that_does_not_fit(tiny_q4km):
    # a context of 100M tokens needs ~90 GiB of KV cache: more than any test machine has
    r = hybrid_run(tiny_q4km, "--device", "cpu", "--ctx", "100000000", "--force-ctx", "-p", "hi")
    assert_one_line_error(r, "does not fit this machine", "--dry-run", code=3)
    # the fix is named as the command line that applies it
    assert re.search(r"a shorter context: \d+ tokens .*`hybrid-run \S+ --device cpu --force-ctx -p hi --ctx \d+`",
                     r.stderr), r.stderr


@pytest.mark.parametrize("args,needle", [
    (["m.gguf", "--temperature", "-1"], "--temperature"),
    (["m.gguf", "--top-p", "0"], "--top-p"),
    (["m.gguf", "--max-tokens", "0"], "--max-tokens"),
    (["m.gguf", "--numa", "sideways"], "--numa"),
    (["m.gguf", "--bogus"], "--bogus"),
    (["m.gguf", "--gpu-mem", "abc", "--device", "cpu"], "--gpu-mem"),
])
def test_bad_flags(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hybrid-run: error: ")


def test_usage_errors(capsys, tmp_path):
    assert main([]) == 2
    assert "give a GGUF model file" in capsys.readouterr().err
    assert main([str(tmp_path / "x.gguf"), "-p", "a", "--serve"]) == 2
    assert "choose one of -p and --serve" in capsys.readouterr().err
    assert main(["--demo", "m.gguf"]) == 2
    assert "--demo builds its own model" in capsys.readouterr().err


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--numa", "--threads", "--ctx", "--device", "--gpu-mem", "--max-tokens", "--temperature",
                 "--top-p", "--top-k", "--seed", "--system", "--no-think", "--serve", "--dry-run", "--demo"):
        assert flag in out
    assert "examples:" in out and "hybrid-run MODEL.gguf -p" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hybrid-run {__version__}"


# ----------------------------------------------------------------------------- one shot


def test_one_shot_prompt_and_stdin_give_the_same_text(tiny_q4km):
    common = ["--device", "cpu", "--ctx", "256", "--max-tokens", "6", "--temperature", "0"]
    a = hybrid_run(tiny_q4km, "-p", "Why is the sky blue?", *common)
    assert a.returncode == 0, a.stderr
    b = hybrid_run(tiny_q4km, "-p", "-", *common, stdin="Why is the sky blue?")
    assert b.returncode == 0, b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    # no TTY: the thinking part is marked in plain text; stats go to stderr, not stdout
    assert a.stdout.startswith("<think>\n")
    assert re.search(r"generated 6 tok, [\d.]+ tok/s \| first token", a.stderr.splitlines()[-1])
    assert "generated" not in a.stdout and "model: tiny-deepseek2" in a.stderr
    assert "Traceback" not in a.stderr


def test_one_shot_raw_and_no_think(tiny_q4km):
    common = ["--device", "cpu", "--ctx", "256", "--max-tokens", "5", "--temperature", "0"]
    raw = hybrid_run(tiny_q4km, "-p", "The quick brown fox", "--raw", *common)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.strip() and "<think>" not in raw.stdout        # no chat template: no R1 prompt
    hidden = hybrid_run(tiny_q4km, "-p", "hello", "--no-think", *common)
    assert hidden.returncode == 0, hidden.stderr
    # random weights never close </think> in 5 tokens: nothing to show but the note
    assert hidden.stdout.strip() == "" and "did not get past its thinking part" in hidden.stderr


def test_empty_prompt_from_stdin(tiny_q4km):
    r = hybrid_run(tiny_q4km, "-p", "-", "--device", "cpu", stdin="")
    assert_one_line_error(r, "the prompt is empty", code=2)


# ----------------------------------------------------------------------------- dry run, demo


def test_one_parser_for_the_run_and_the_dry_run(tiny_q4km, capsys):
    # run-only flags are accepted by the dry-run (and ignored); the dry-run's own flags are
    # refused by the run with a line that says to add --dry-run
    assert main([str(tiny_q4km), "--dry-run", "--max-tokens", "5", "--temperature=0.2", "--no-think",
                 "-p", "hi", "--device", "cpu", "--ctx", "512", "--prefill-chunk", "64"]) == 0
    assert "prefill chunk 64" in capsys.readouterr().out
    for flag in (["--ram", "64GiB"], ["--preset", "deepseek-r1-q4_k_m"], ["--json"], ["--bind-node", "0"]):
        assert main([str(tiny_q4km), "-p", "hi", *flag]) == 2
        err = capsys.readouterr().err
        assert f"{flag[0]} is a --dry-run flag" in err and len(err.strip().splitlines()) == 1


def test_dry_run_goes_to_the_placement_cli(tiny_q4km, capsys):
    assert main([str(tiny_q4km), "--dry-run", "--device", "cpu", "--max-tokens", "5", "--ctx", "512"]) == 0
    out = capsys.readouterr().out
    assert "verdict: FITS" in out and "context 512" in out
    assert main([str(tiny_q4km), "--dry-run", "--ctx", "100000000", "--device", "cpu", "--force-ctx"]) == 3


def test_demo_builds_once_and_reports_speed(tmp_path, monkeypatch, capsys):
    """--demo deepseek2 end to end, on the tests' tiny config so that it runs in seconds (the
    default demo, smollm2: tests/test_demo_smollm2.py)."""
    import llama_cpp  # noqa: F401
    from hybrid.app import demo
    from hybrid.fixtures import TinyConfig

    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "_config", lambda: TinyConfig(n_layer=2))
    assert main(["--demo", "deepseek2", "--device", "cpu", "--max-tokens", "8", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "building the demo model once" in out
    assert "model: tiny-deepseek2" in out and "placement:" in out          # the plan summary
    assert "gibberish" in out
    assert re.search(r"prompt: +\d+ tokens in [\d.]+ s = [\d.]+ tok/s", out)
    assert re.search(r"generation: 8 tokens in [\d.]+ s = [\d.]+ tok/s", out)
    assert len(list((tmp_path / "cache").glob("*.gguf"))) >= 1
    assert main(["--demo", "deepseek2", "--device", "cpu", "--max-tokens", "2"]) == 0    # cached: no rebuild
    assert "building" not in capsys.readouterr().out


def test_model_id_strips_extension_and_split_suffix():
    assert model_id("/m/DeepSeek-R1-Q4_K_M-00001-of-00009.gguf") == "DeepSeek-R1-Q4_K_M"
    assert model_id("tiny.GGUF") == "tiny"


class _Stop(Exception):
    """Raised by load_spy's hybrid.load: the test needs the arguments, not a model."""


@pytest.fixture
def load_spy(monkeypatch):
    """hybrid.load replaced by a spy: (the keyword arguments it got, the exception it raises)."""
    import hybrid

    seen = {}

    def spy(path, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(hybrid, "load", spy)
    return seen, _Stop


def test_no_hugepages_reaches_the_loader(tiny_q4km, load_spy):
    import io

    from hybrid.app import cli

    seen, Stop = load_spy
    for flags, want in (([], True), (["--no-hugepages"], False)):
        a = cli.build_parser().parse_args([str(tiny_q4km), "--device", "cpu", "--ctx", "32", *flags])
        with pytest.raises(Stop):
            cli.load_runtime(str(tiny_q4km), a, cli.make_plan(str(tiny_q4km), a), io.StringIO())
        assert seen["hugepages"] is want


# ----------------------------------------------------------------------------- issue 19 edges


def test_threads_never_above_the_allowed_cpus(tiny_q4km, load_spy, monkeypatch, capsys):
    """--threads 4 on 2 allowed cpus took decode from 660 to 11 tok/s: the run takes the
    allowed count and says so."""
    import os

    seen, Stop = load_spy
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for asked, used in ((1000, 2), (4, 2), (1, 1), (None, None)):
        flags = ["--threads", str(asked)] if asked else []
        with pytest.raises(Stop):
            main([str(tiny_q4km), "--device", "cpu", "--ctx", "32", "-p", "hi", *flags])
        err = capsys.readouterr().err
        assert seen["threads"] == used
        assert (f"--threads {asked}: this process may use 2 cpu(s); running 2 worker(s)" in err) == (asked != used)


def test_bad_hybrid_isa_is_one_line(tiny_q4km):
    r = hybrid_run(tiny_q4km, "-p", "hi", env={"HYBRID_ISA": "foo"})
    assert_one_line_error(r, "HYBRID_ISA=foo", "scalar, avx2 or avx512", code=2)


def test_broken_pipe_is_quiet_and_keeps_the_status():
    # the pipe shrunk to one page: the report (~5.5 KB) cannot go out in one write, so the
    # reader is gone while the writer still writes (with the default 64 KB pipe the whole
    # report fitted before the reader closed, and a missing handler went unseen)
    code = ("import fcntl, os, subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'hybrid.app.cli', "
            "'--dry-run', '--preset', 'deepseek-r1-q4_k_m', '--hardware', '2x256g-48g', '--numa', 'replicate'], "
            "stdout=subprocess.PIPE, stderr=subprocess.PIPE); fcntl.fcntl(p.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096); "
            "os.read(p.stdout.fileno(), 100); p.stdout.close(); "
            "err = p.stderr.read().decode(); print(p.wait()); print(err)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=hybrid_env(), cwd=NEUTRAL_CWD)
    status, _, err = r.stdout.partition("\n")
    assert status == "3" and "Traceback" not in err and "BrokenPipe" not in err, r.stdout


def test_help_lists_every_flag_in_groups(capsys):
    """--help names every option, the dry-run's too, under the group it belongs to."""
    parser_actions = [a for a in __import__("hybrid.app.cli", fromlist=["x"]).build_parser()._actions
                      if a.option_strings]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for a in parser_actions:
        assert any(s in out for s in a.option_strings), a.option_strings
    for group in ("placement (the run and --dry-run alike", "dry-run: model and report",
                  "dry-run: a hypothetical machine", "generation:", "runtime:"):
        assert group in out, group
    assert max(len(line) for line in out.splitlines()) <= 100


def test_the_run_takes_the_placement_flags(tiny_q4km, load_spy):
    """--prefill-chunk and --gpu-format reach the run (they were the dry-run's alone)."""
    import io

    from hybrid.app import cli

    seen, Stop = load_spy
    a = cli.build_parser().parse_args([str(tiny_q4km), "--cpu-only", "--ctx", "64", "--prefill-chunk", "32",
                                       "--no-expert-cache"])
    plan = cli.make_plan(str(tiny_q4km), a)
    assert plan.workload["prefill_chunk"] == 32 and plan.policy["expert_cache"] is False
    with pytest.raises(Stop):
        cli.load_runtime(str(tiny_q4km), a, plan, io.StringIO())
    assert seen["prefill_chunk"] == 32 and seen["device"] == "cpu"


def test_readme_names_only_flags_that_exist():
    """The README's section on the command line names no flag the parser lacks, and the
    flags that used to be the dry-run's alone."""
    import pathlib

    from hybrid.app.cli import build_parser

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = text[text.index("## Using it"):text.index("## Which library does what")]
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", text))
    unknown = flags - set(build_parser()._option_string_actions)
    assert not unknown, sorted(unknown)
    for f in ("--gpu-format", "--prefill-chunk", "--cpu-only", "--expert-stats", "--force-ctx", "--bind-node"):
        assert f in flags


def test_the_run_plans_what_the_dry_run_shows(tiny_q4km, capsys):
    """The run's header and the dry-run give one estimate for the same flags on this machine
    (they said 134 and 176 tok/s for one model: the dry-run planned small linears as f32)."""
    import json

    from hybrid.app import cli

    flags = [str(tiny_q4km), "--device", "cpu", "--ctx", "256"]
    plan = cli.make_plan(str(tiny_q4km), cli.build_parser().parse_args(flags))
    assert main(flags + ["--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["estimate"]["decode_tok_s"] == plan.estimate["decode_tok_s"]
    assert dry["estimate"]["prefill_tok_s"] == plan.estimate["prefill_tok_s"]
    assert dry["devices"]["cpu"]["bytes"] == plan.devices["cpu"].bytes and dry["cpu_linear_min_bytes"] == 0
