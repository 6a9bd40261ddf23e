#!/usr/bin/env bash
# On the GPU machine: where serving's step time goes. Builds `ernie`, then for each server
# configuration (PROBE_SERVE_ARGS, '|'-separated; default: none) starts the 21B config with dummy
# weights at VLLM_LOGGING_LEVEL=DEBUG and runs the issue's three benchmarks against it (the seed
# 16 x 8000/1000 at 10/s first, then one prompt of 1000/1000, then 256 prompts of 1000/1000 at
# rate inf), printing the benchmark's figures and the server's step-time lines (host build,
# device + sampling, outputs, between steps, preemptions). Logs go under DIR.
# Usage: scripts/gpu_serve_probe.sh DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-probe-results}")
mkdir -p "$out"
(cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 &&
  cmake --build build-gpu -j "$(nproc)" --target ernie > "$out/build.log" 2>&1) ||
  { tail -30 "$out/build.log"; exit 1; }
echo "built (${SECONDS}s)"
ernie=build-gpu/ernie model=/tmp/ernie-21b
rm -rf "$model"
$ernie make-model --preset 21b-a3b --no-weights --out "$model" > /dev/null 2>&1
IFS='|' read -ra configs <<< "${PROBE_SERVE_ARGS:--}"
n=0
for config in "${configs[@]}"; do
  n=$((n + 1))
  args=()
  [ "$config" = - ] || read -ra args <<< "$config"
  log="$out/$n-serve.log"
  VLLM_LOGGING_LEVEL=DEBUG $ernie serve "$model" --load-format dummy --port 8200 "${args[@]}" \
    > "$log" 2>&1 &
  server=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:8200/health > /dev/null && break; sleep 1; done
  echo "== serve $config (up at ${SECONDS}s)"
  grep -E "KV cache:" "$log"
  for run in "16 10 8000" "1 1 1000" "256 inf 1000"; do
    set -- $run
    $ernie bench serve --model "$model" --port 8200 --dataset-name random \
      --random-input-len "$3" --random-output-len 1000 --request-rate "$2" --num-prompts "$1" \
      --ignore-eos --disable-tqdm > "$out/$n-bench_$1.txt" 2>&1
    echo "-- $1 prompts of $3/1000 at rate $2:"
    grep -E "^(Benchmark duration|Output token throughput|Mean TTFT|Mean TPOT|Median ITL)" \
      "$out/$n-bench_$1.txt"
  done
  kill -INT $server; wait $server
  grep -E "Step times" "$log" | tail -6
done
