"""Environment for tests that start `python -m hybrid...` in a subprocess.

They must run the same hybrid the tests import: the installed package in CI (the source tree
has no compiled extension there), the source tree with its in-place build during development.
So PYTHONPATH points at the directory holding the imported package, and the child starts in a
directory without a `hybrid/` folder of its own.
"""

import os
import tempfile

import hybrid

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(hybrid.__file__)))
NEUTRAL_CWD = tempfile.gettempdir()


def hybrid_env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, extra.get("PYTHONPATH", "")) if p)
    return env
