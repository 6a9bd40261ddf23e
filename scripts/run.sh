#!/usr/bin/env bash
# The main job on the embedded default: set up, build, write a small synthetic ERNIE-4.5 MoE
# checkpoint (random weights, a trained tokenizer, the ERNIE chat template), start
# `ernie serve` on it (the GPU when one is usable, else the CPU; port 8000 unless PORT is
# set), answer one chat request with curl, and keep serving until Ctrl-C. Random weights make
# fluent-looking nonsense.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh >/dev/null
model=build/demo-model
port=${PORT:-8000}
[ -f "$model/tokenizer.model" ] || build/ernie make-model --preset tiny --seed 0 --out "$model"
build/ernie serve "$model" --served-model-name ernie-demo --port "$port" --max-model-len 2048 "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || exit 1
  sleep 0.2
done
echo "--- POST /v1/chat/completions"
curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "ernie-demo", "messages": [{"role": "user", "content": "Hello! What can you do?"}], "max_tokens": 32}'
echo
echo "--- serving on http://127.0.0.1:$port (Ctrl-C to stop)"
wait $server
