#!/usr/bin/env bash
# The main job on the embedded default: set up, build, write a small synthetic ERNIE-4.5 MoE
# checkpoint, and generate from it on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh >/dev/null
model=build/demo-model
[ -f "$model/model.safetensors.index.json" ] || build/ernie make-model --preset tiny --seed 0 --out "$model"
exec build/ernie generate --model "$model" --prompt-token-ids 1,2,3,4 --prompt-token-ids 100,200 \
  --max-tokens 16 --temperature 0 --logprobs 2 --json "$@"
