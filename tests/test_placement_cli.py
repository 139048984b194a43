"""`hybrid-run --dry-run`: exit status, JSON fields, hardware from flags and from a profile."""

import json

import pytest

from placement.cli import main
from placement.units import GiB

R1 = ["--preset", "deepseek-r1-q4_k_m"]
BOX = ["--gpu-mem", "48GiB", "--ram", "512GiB", "--numa-nodes", "2", "--cores", "64"]


def run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_fits_exit_0_and_json_fields(capsys):
    rc, out, err = run(capsys, R1 + BOX + ["--numa", "interleave", "--json"])
    assert rc == 0, err
    d = json.loads(out)
    assert d["fits"] is True
    assert d["weights_bytes"] == 404424884224
    for dev in ("gpu0", "cpu", "numa0", "numa1"):
        assert {"bytes", "capacity_bytes", "breakdown", "free_bytes"} <= set(d["devices"][dev])
    assert d["devices"]["gpu0"]["capacity_bytes"] == 48 * GiB
    assert d["kv_cache_bytes"] == d["kv_cache_tokens"] * 70272 and d["kv_cache_tokens"] >= 32768
    assert len(d["gpu_experts"]) == 61 and d["problems"] == [] and d["suggestions"] == []
    assert d["estimate"]["decode_tok_s"] > 0 and d["numa_mode"] == "interleave"
    assert d["hardware"]["ram_total"] == 512 * GiB and d["hardware"]["sources"]["ram"] == "override"


def test_does_not_fit_exit_3(capsys):
    rc, out, _ = run(capsys, R1 + BOX + ["--numa", "replicate"])
    assert rc == 3
    assert "DOES NOT FIT" in out and "2x expert memory" in out and "--numa interleave" in out
    rc, out, _ = run(capsys, R1 + BOX + ["--numa", "replicate", "--json"])
    d = json.loads(out)
    assert rc == 3 and d["fits"] is False and d["problems"] and d["suggestions"]
    assert all({"budget", "needed_bytes", "available_bytes", "over_bytes", "message"} <= set(p) for p in d["problems"])


def test_text_report_is_readable(capsys):
    rc, out, _ = run(capsys, R1 + BOX + ["--gpu-mem", "80GiB"])
    assert rc == 0
    for s in ("verdict: FITS", "gpu0", "numa1", "tensor group", "routed_experts", "KV cache", "GPU expert cache",
              "estimate: decode", "L60:"):
        assert s in out


def test_profile_and_overrides_on_top(capsys):
    rc, out, _ = run(capsys, R1 + ["--hardware", "2x256g-48g", "--json"])
    d = json.loads(out)
    assert rc == 0 and d["hardware"]["sources"]["all"] == "profile:2x256g-48g"
    assert d["devices"]["gpu0"]["capacity_bytes"] == 48 * GiB
    assert "150 GB/s (given)" in d["estimate"]["assumptions"]["ram_bandwidth_per_node"]
    rc, out, _ = run(capsys, R1 + ["--hardware", "2x256g-48g", "--bind-node", "1"])
    assert rc == 3 and "numactl -N 1 -m 1" in out
    rc, out, _ = run(capsys, R1 + ["--hardware", "2x256g-48g", "--gpu-mem", "24GiB", "--json"])
    d = json.loads(out)
    assert rc == 0 and d["gpu_weight_format"] == "quantized" and d["devices"]["gpu0"]["capacity_bytes"] == 24 * GiB
    rc, out, _ = run(capsys, R1 + ["--hardware", "2x256g-48g", "--ram", "256GiB", "--numa-nodes", "1"])
    assert rc == 3 and "GiB missing" in out and "a machine with 384 GiB of RAM" in out


def test_policy_flags(capsys):
    rc, out, _ = run(capsys, R1 + BOX + ["--ctx", "8192", "--no-expert-cache", "--cuda-context", "1GiB", "--json"])
    d = json.loads(out)
    assert rc == 0 and d["kv_cache_tokens"] == 8192 and d["n_gpu_experts"] == 0
    assert d["devices"]["gpu0"]["breakdown"]["cuda_context"] == GiB
    rc, out, _ = run(capsys, R1 + BOX + ["--cpu-only", "--json"])
    d = json.loads(out)
    assert rc == 0 and "gpu0" not in d["devices"] and d["gpu_weight_format"] == "none"


def test_expert_stats_file(capsys, tmp_path):
    stats = {str(l): [0] * 256 for l in range(3, 61)}
    for l in stats:
        stats[l][42] = 100
    f = tmp_path / "stats.json"
    f.write_text(json.dumps(stats))
    rc, out, _ = run(capsys, R1 + BOX + ["--expert-stats", str(f), "--json"])
    d = json.loads(out)
    assert rc == 0 and all(42 in d["gpu_experts"][l] for l in range(3, 61))


def test_usage_errors_exit_2_with_one_line(capsys, tmp_path):
    for argv, what in (
        ([], "--preset"),
        (["--preset", "nope"], "deepseek-r1-q4_k_m"),
        ([str(tmp_path / "missing.gguf")], "missing.gguf"),
        (R1 + ["--gpu-mem", "lots"], "not a size"),
        (R1 + ["--hardware", "no-such"], "2x256g-48g"),
        (R1 + ["--hardware", "2x256g-48g", "--bind-node", "7"], "--bind-node 7"),
    ):
        rc, out, err = run(capsys, argv)
        assert rc == 2, argv
        assert what in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + b"\0" * 64)
    rc, _, err = run(capsys, [str(not_gguf)])
    assert rc == 2 and "x.gguf" in err and "not a GGUF" in err


def test_lists(capsys):
    rc, out, _ = run(capsys, ["--list-presets"])
    assert rc == 0 and "deepseek-r1-q8_0" in out.split()
    rc, out, _ = run(capsys, ["--list-profiles"])
    assert rc == 0 and "2x256g-48g" in out.split()
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_hybrid_run_routes_dry_run(capsys):
    from hybrid.app.cli import main as hybrid_main

    rc = hybrid_main(["--dry-run"] + R1 + BOX + ["--numa", "replicate"])
    out, _ = capsys.readouterr()
    assert rc == 3 and "DOES NOT FIT" in out


def test_gguf_file_on_this_machine(capsys, tiny_f32):
    rc, out, err = run(capsys, [str(tiny_f32), "--json"])
    assert rc == 0, err
    d = json.loads(out)
    assert d["fits"] and d["architecture"] == "deepseek2" and d["source"] == str(tiny_f32)
    assert d["kv_cache_tokens"] == 4096    # the tiny model's context_length < 32K


def test_configs_dir_found():
    from placement.configs import config_dir

    assert (config_dir() / "hardware" / "2x256g-48g.json").is_file()
    assert (config_dir() / "presets" / "deepseek-r1.json").is_file()


@pytest.mark.parametrize("flag", ["--allowed-mems", "--allowed-cpus"])
def test_allowed_lists(capsys, flag):
    value = "1" if flag == "--allowed-mems" else "0-31"
    rc, out, _ = run(capsys, R1 + ["--hardware", "2x256g-48g", flag, value, "--json"])
    d = json.loads(out)
    if flag == "--allowed-mems":
        assert rc == 3 and d["devices"]["cpu"]["capacity_bytes"] == 256 * GiB
    else:
        assert rc == 0 and d["hardware"]["allowed_cpus"] == "0-31"
        assert "32 cores" in d["estimate"]["assumptions"]["cpu_compute"]


def test_dry_run_never_imports_torch_or_the_native_module():
    import subprocess
    import sys

    code = ("import sys; from placement.cli import main; "
            "rc = main(['--preset', 'deepseek-r1-q4_k_m', '--hardware', '2x256g-48g', '--json']); "
            "bad = [m for m in ('torch', 'hybrid._native') if m in sys.modules]; "
            "sys.exit(10 if bad else rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 3), r.stderr[-2000:]
