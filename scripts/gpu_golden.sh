#!/usr/bin/env bash
# On a machine with torch + transformers: build ernie, then regenerate the transformers golden
# fixtures into ${1:-tests/golden}. Runs on the GPU machine (fast) or any machine with torch.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-tests/golden}
gen=Ninja; command -v ninja >/dev/null || gen="Unix Makefiles"
cmake -S . -B build-golden -G "$gen" -DCMAKE_BUILD_TYPE=Release -DERNIE_TESTS=OFF -DERNIE_CUDA=OFF >/dev/null
cmake --build build-golden -j "$(nproc)" --target ernie
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
PYTHONUNBUFFERED=1 python3 tools/make_golden.py --ernie build-golden/ernie --out "$out"
