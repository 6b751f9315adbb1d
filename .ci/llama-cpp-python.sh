#!/usr/bin/env bash
# Install llama-cpp-python[server] (for the GREEN scorer's tests against a real llama.cpp server)
# into the venv whose python is $1 (default .venv/bin/python).
#
# PyPI ships it as source only: the first build takes about 8 CPU-minutes. The wheel is kept in
# $LLAMA_WHEEL_DIR (default ~/.cache/radialog-rl/wheels, outside the checkout so that later CI
# clones on the same machine find it; pip's own wheel cache is a second layer), so later runs
# install it in seconds.
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=0.3.36
WHEEL_DIR=${LLAMA_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/radialog-rl/wheels}
if "$PY" -c "import llama_cpp.server" 2>/dev/null; then
  exit 0
fi
mkdir -p "$WHEEL_DIR"
if ! ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION from source (once; cached in $WHEEL_DIR)"
  # A portable CPU build: no -march=native, no OpenMP or BLAS, no curl (nothing downloads at run time).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$WHEEL_DIR"
fi
"$PY" -m pip install -q --find-links "$WHEEL_DIR" "llama-cpp-python[server]==$VERSION"
