#!/usr/bin/env bash
# Configures and builds ernie in Release into build/ (CUDA too when nvcc is installed).
# Extra arguments go to cmake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
if [ ! -f build/CMakeCache.txt ]; then
  cmake -S . -B build "${gen[@]}" -DCMAKE_BUILD_TYPE=Release "$@"
elif [ $# -gt 0 ]; then
  cmake -S . -B build "$@"
fi
jobs=${ERNIE_BUILD_JOBS:-$(nproc)}
cmake --build build -j "$jobs"
