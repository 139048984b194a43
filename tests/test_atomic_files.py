"""Files we write are whole or absent: temporary name + rename, and the temporary files of a
killed run are removed by the next one (hybrid.atomic)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from subproc import NEUTRAL_CWD, hybrid_env
from hybrid.atomic import atomic_path, remove_stale_temps, temp_path, write_text


def _temps(d):
    return sorted(p.name for p in pathlib.Path(d).iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    dst = tmp_path / "stats.json"
    write_text(dst, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(dst) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("killed halfway")
    assert dst.read_text() == "old" and _temps(tmp_path) == []
    write_text(dst, "new")
    assert dst.read_text() == "new" and _temps(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".a.gguf.{dead.pid}.tmp").write_bytes(b"x")
        (tmp_path / f".a.gguf.{live.pid}.tmp").write_bytes(b"x")        # a concurrent writer
        (tmp_path / f".b.json.{dead.pid}.tmp").write_bytes(b"x")
        (tmp_path / "notes.tmp").write_bytes(b"x")                     # not ours
        old = tmp_path / f".c.json.{live.pid}.tmp"                     # untouched for hours
        old.write_bytes(b"x")
        os.utime(old, (time.time() - 2 * 3600,) * 2)
        remove_stale_temps(tmp_path, "b.json")                          # only b.json's
        assert _temps(tmp_path) == sorted([f".a.gguf.{dead.pid}.tmp", f".a.gguf.{live.pid}.tmp",
                                           old.name, "notes.tmp"])
        remove_stale_temps(tmp_path)
        assert _temps(tmp_path) == sorted([f".a.gguf.{live.pid}.tmp", "notes.tmp"])
    finally:
        live.kill()
        live.wait()


def test_expert_stats_and_chat_save_write_through_a_temporary(tmp_path, monkeypatch):
    """Both writers go through hybrid.atomic: with the rename failing, the old file stays."""
    import hybrid.atomic
    from hybrid.app.chat import Chat
    from hybrid.runtime.stats import ExpertStats

    stats = ExpertStats(2, 4, [1], n_expert_used=2)
    dst = tmp_path / "stats.json"
    stats.save(dst)
    assert json.loads(dst.read_text())["n_expert"] == 4
    dst.write_text("old")

    def no_rename(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hybrid.atomic.os, "replace", no_rename)
    with pytest.raises(OSError):
        stats.save(dst)
    assert dst.read_text() == "old" and _temps(tmp_path) == []
    said = []
    chat = Chat.__new__(Chat)
    chat.model_name, chat.messages, chat.params = "m", [], {}
    chat.session = type("S", (), {"history": []})()
    chat._with_system = lambda m: m
    chat.say = said.append
    (tmp_path / "chat.json").write_text("old")
    chat.save(str(tmp_path / "chat.json"))
    assert (tmp_path / "chat.json").read_text() == "old" and _temps(tmp_path) == []
    assert said and "No space left" in said[-1]
    monkeypatch.undo()
    chat.save(str(tmp_path / "chat.json"))
    assert json.loads((tmp_path / "chat.json").read_text())["model"] == "m"


def test_a_killed_demo_build_leaves_no_temporary_after_the_next_run(tmp_path):
    env = hybrid_env(HYBRID_CACHE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "hybrid.app.cli", "--demo", "deepseek2", "--dry-run"]
    p = subprocess.Popen(cmd, env=env, cwd=NEUTRAL_CWD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _temps(tmp_path) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _temps(tmp_path)
        assert left, "the build wrote no temporary file (or finished before one was seen)"
    finally:
        p.kill()
        p.wait()
    assert p.returncode < 0 and _temps(tmp_path) == left and left[0].endswith(f".{p.pid}.tmp")
    r = subprocess.run(cmd, env=env, cwd=NEUTRAL_CWD, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _temps(tmp_path) == [], _temps(tmp_path)
    assert [q.name for q in tmp_path.iterdir() if q.name.endswith("Q4_K_M.gguf")]
