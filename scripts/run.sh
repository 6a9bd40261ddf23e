#!/usr/bin/env bash
# The main job on the embedded default: set up, build, write a small synthetic ERNIE-4.5 MoE
# checkpoint (random weights, a small trained tokenizer, the ERNIE chat template), and answer a
# chat message with it on the CPU. Random weights make fluent-looking nonsense.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh >/dev/null
model=build/demo-model
[ -f "$model/tokenizer.model" ] || build/ernie make-model --preset tiny --seed 0 --out "$model"
exec build/ernie generate --model "$model" --chat "Hello! What can you do?" --max-tokens 32 \
  --temperature 0 "$@"
