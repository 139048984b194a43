#!/usr/bin/env bash
# Install hybrid with its test dependencies into ./.venv and run the test suite.
# This is the README's test command; .ci/run calls it unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: the project's `torch>=2.1` is then already satisfied and pip
# does not pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# Optional: SIMDe lets the AVX-512 kernels be checked on CPUs without AVX-512.
if [ ! -e /usr/include/simde/x86/avx512.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -qq libsimde-dev >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libsimde-dev >/dev/null 2>&1; } \
    || echo "note: libsimde-dev not installed; the emulated AVX-512 test will be skipped"
fi
python -m pip install -q ".[test]"
# `pytest` (not `python -m pytest`, which puts the source tree first on sys.path) so the
# tests import the installed package with its compiled extension.
pytest tests "$@"
