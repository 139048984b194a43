#!/usr/bin/env bash
# The GPU check of issue 18 in one command (scripts/gpu_check.py says what it checks).
#
#   scripts/gpu-check.sh --prepare DIR   # here (network, llama-cpp-python): pure-Python deps into
#                                        # DIR/pylib, fixtures and CPU reference logits into DIR
#   scripts/gpu-check.sh DIR             # the GPU machine (CUDA torch, cmake, a compiler, no
#                                        # network): builds the extension, runs the checks,
#                                        # writes DIR/summary.txt and DIR/summary.json
#
# PYTHON picks the interpreter (default python3; it must have torch). Without CUDA every
# CUDA check is one "skipped: no CUDA" line and the exit status is 0.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
GPU_CHECK_STAND_IN="${GPU_CHECK_STAND_IN:-}"
# the native extension, built in place when the checkout has none (a fresh clone): prepare
# computes the CPU reference logits with it, run needs it for the CPU engine
build_native() {
  ls "$ROOT"/hybrid/_native*.so >/dev/null 2>&1 && return 0
  local build="$1"
  PB="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
  cmake -S "$ROOT" -B "$build" -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$PB" \
        -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
  cmake --build "$build" -j "$(nproc)" >/dev/null
  cp "$build"/_native*.so "$ROOT/hybrid/"
}
if [ "${1:-}" = "--prepare" ]; then
  DIR="$(mkdir -p "${2:?--prepare DIR}" && cd "$2" && pwd)"
  # the Python packages the GPU machine lacks (torch and numpy come with its CUDA torch;
  # py-libnuma is optional: without it NUMA detection reads sysfs)
  # (pyyaml and markupsafe fall back to pure Python where their compiled parts do not load;
  # psutil's wheel is abi3: any CPython 3 on Linux x86_64)
  "$PY" -m pip install -q --no-deps --target "$DIR/pylib" gguf pyyaml pytest pluggy iniconfig \
    packaging pybind11 jinja2 markupsafe tqdm psutil
  # the tests' conftest imports llama_cpp before building a quantized fixture; the fixtures
  # are prebuilt in DIR/fixtures, so a stand-in that refuses to work is enough there
  mkdir -p "$DIR/pylib/llama_cpp"
  cat > "$DIR/pylib/llama_cpp/__init__.py" <<'PYEOF'
"""Stand-in for llama-cpp-python on the GPU check machine (scripts/gpu-check.sh): the fixtures
are prebuilt and the reference logits were computed before; anything that needs llama.cpp
itself fails here loudly."""


def __getattr__(name):
    raise ImportError(f"llama_cpp.{name}: llama-cpp-python is not on the GPU check machine")
PYEOF
  PYTHONPATH="$DIR/pylib" build_native "$(mktemp -d)"
  PYTHONPATH="$ROOT" "$PY" "$ROOT/scripts/gpu_check.py" prepare "$DIR"
  rm -f "$DIR"/fixtures/*-F32.gguf "$DIR"/fixtures/*-F16.gguf   # the sources of the Q4_K_M files
  rm -rf "$DIR"/pylib/bin
  du -sh "$DIR"
  exit 0
fi
DIR="$(cd "${1:?usage: gpu-check.sh [--prepare] DIR}" && pwd)"
export PYTHONPATH="$DIR/pylib:$ROOT"
HAS_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [ "$HAS_CUDA$GPU_CHECK_STAND_IN" != "0" ]; then
  build_native "$DIR/build"
fi
timeout 480 "$PY" "$ROOT/scripts/gpu_check.py" run "$DIR"
