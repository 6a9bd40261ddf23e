#!/usr/bin/env bash
# On the GPU machine, after a build (scripts/gpu_check.sh): the throughput table of
# docs/performance.md. Starts `ernie serve` on the 21B config with dummy weights, runs
# `ernie bench serve` at request rate inf for each workload (input/output lengths) and prompt
# count, and prints a markdown row per run: output tok/s, mean TTFT, mean TPOT, the TPOT floor
# of a decode step at that batch and mean context (`ernie roofline`), and TPOT / floor. The
# batch is the prompt count, capped by max-num-seqs and by the sequences the KV cache holds.
#   scripts/gpu_sweep.sh [RESULT_DIR] ["IN/OUT:N1,N2,..." ...]
# Default runs: 1000/1000 at 1, 16, 64, 256 prompts. Extra serve flags: ERNIE_SERVE_ARGS;
# ERNIE (binary, default build-gpu/ernie) and ERNIE_SWEEP_PRESET (default 21b-a3b) for trying
# the script elsewhere. ERNIE_BANDWIDTH: the floor's bytes/s (default 3.1e12, an H100's; the
# "floors at" line of ernie_kernel_bench gives this machine's).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-results}")
shift || true
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=("1000/1000:1,16,64,256")
mkdir -p "$out"
ernie=${ERNIE:-build-gpu/ernie}
preset=${ERNIE_SWEEP_PRESET:-21b-a3b}
model=/tmp/ernie-sweep-$preset
[ -f "$model/config.json" ] || $ernie make-model --preset "$preset" --no-weights --out "$model" > /dev/null 2>&1
$ernie serve "$model" --load-format dummy --port 8201 ${ERNIE_SERVE_ARGS:-} > "$out/sweep_serve.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 600); do
  curl -sf http://127.0.0.1:8201/health > /dev/null && break
  kill -0 $server 2>/dev/null || { tail -20 "$out/sweep_serve.log"; exit 1; }
  sleep 1
done
# The server's sequences per step (its startup line "max_num_seqs N"; the default depends on the GPU).
max_seqs=$(sed -n 's/.*max_num_seqs \([0-9]*\).*/\1/p' "$out/sweep_serve.log" | head -1)
max_seqs=${max_seqs:-256}
# The floor's batch: the prompts, at most max_seqs, and at most the sequences of in + out tokens
# that the KV cache holds (the server's startup line "KV cache: N blocks of B tokens (T tokens)").
kv_tokens=$(sed -n 's/.*KV cache: [0-9]* blocks of [0-9]* tokens (\([0-9]*\) tokens).*/\1/p' \
  "$out/sweep_serve.log" | head -1)
echo "| in/out | prompts | output tok/s | mean TTFT ms | mean TPOT ms | floor TPOT ms | TPOT / floor |"
echo "|---|---|---|---|---|---|---|"
for run in "${runs[@]}"; do
  io=${run%%:*}; in=${io%%/*}; outlen=${io##*/}
  IFS=, read -ra counts <<< "${run##*:}"
  for n in "${counts[@]}"; do
    name="sweep_${in}_${outlen}_${n}.json"
    $ernie bench serve --model "$model" --host 127.0.0.1 --port 8201 --dataset-name random \
      --random-input-len "$in" --random-output-len "$outlen" --num-prompts "$n" \
      --request-rate inf --ignore-eos --disable-tqdm --save-result --result-dir "$out" \
      --result-filename "$name" > "$out/${name%.json}.txt" 2>&1 || { echo "| $io | $n | failed |"; continue; }
    batch=$(( n < max_seqs ? n : max_seqs ))
    if [ -n "$kv_tokens" ]; then
      fit=$(( kv_tokens / (in + outlen) ))
      [ "$fit" -ge 1 ] && [ "$fit" -lt "$batch" ] && batch=$fit
    fi
    floor=$($ernie roofline --model "$model" --batch "$batch" --context $(( in + outlen / 2 )) \
      --bandwidth "${ERNIE_BANDWIDTH:-3.1e12}")
    python3 - "$out/$name" "$floor" "$io" "$n" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = json.loads(sys.argv[2])
print(f"| {sys.argv[3]} | {sys.argv[4]} | {r['output_throughput']:.0f} | {r['mean_ttft_ms']:.0f} | "
      f"{r['mean_tpot_ms']:.2f} | {f['floor_ms']:.2f} | {r['mean_tpot_ms'] / f['floor_ms']:.2f} |")
PY
  done
done
