"""Files we write are never half-written: each is written under a temporary name beside it
(`.NAME.PID.tmp`) and renamed over NAME (atomic on POSIX), so a reader sees the old file or
the whole new one. A run killed while writing leaves its temporary file; the next writer of
the same directory removes those whose process is gone (or that nothing has touched for
STALE_AFTER_S: a live writer keeps its file fresh, a reused pid does not).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import time

__all__ = ["STALE_AFTER_S", "atomic_path", "remove_stale_temps", "temp_path", "write_text"]

STALE_AFTER_S = 3600
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temp_path(dst) -> pathlib.Path:
    """This process's temporary name for dst."""
    dst = pathlib.Path(dst)
    return dst.with_name(f".{dst.name}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_temps(directory, name: str | None = None) -> list[pathlib.Path]:
    """Remove the temporary files of dead writers in directory (only those of `name` when
    given: in a directory of the user's, leave other files alone). Returns what was removed."""
    d = pathlib.Path(directory)
    removed = []
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        m = _TEMP.match(e.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        try:
            old = now - e.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if not e.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and (old or not _alive(pid)):
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                removed.append(pathlib.Path(e.path))
    return removed


@contextlib.contextmanager
def atomic_path(dst, *, clean_dir: bool = False):
    """Yields the temporary path to write; on success it replaces dst, on any failure it is
    removed. Stale temporaries of dst (of the whole directory with clean_dir) go first."""
    dst = pathlib.Path(dst)
    remove_stale_temps(dst.parent, None if clean_dir else dst.name)
    tmp = temp_path(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path, text: str) -> None:
    """Write a text file whole or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
