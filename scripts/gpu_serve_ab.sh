#!/usr/bin/env bash
# On the GPU machine: the serving benchmark under each given configuration of environment
# switches, one server start per configuration (21B config, dummy weights), so that a kernel
# path's effect on served requests is measured on one machine. Usage:
#   scripts/gpu_serve_ab.sh DIR CONFIG...
# A CONFIG is a comma-separated list of NAME=VALUE settings ("-" for none), as in gpu_ab.sh.
# SERVE_AB_BENCH: the `ernie bench serve` arguments after the model and port (default one
# prompt of 1000/1000 at rate 1); SERVE_AB_REPEAT: runs per configuration (default 3). Logs go
# under DIR; each run's throughput, TTFT and TPOT lines are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-serve-ab-results}")
shift || true
mkdir -p "$out"
gen=Ninja; command -v ninja >/dev/null || gen="Unix Makefiles"
if [ ! -f build-gpu/CMakeCache.txt ]; then
  cmake -S . -B build-gpu -G "$gen" -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 ||
    { tail -30 "$out/configure.log"; exit 1; }
fi
cmake --build build-gpu -j "$(nproc)" --target ernie > "$out/build.log" 2>&1 ||
  { tail -50 "$out/build.log"; exit 1; }
ernie=build-gpu/ernie
model=/tmp/ernie-21b-ab
rm -rf "$model"
$ernie make-model --preset 21b-a3b --no-weights --out "$model" > "$out/make_model.log" 2>&1 ||
  { tail -20 "$out/make_model.log"; exit 1; }
bench_args=${SERVE_AB_BENCH:---dataset-name random --random-input-len 1000 \
--random-output-len 1000 --request-rate 1 --num-prompts 1}
rc=0
n=0
for config in "$@"; do
  settings=()
  [ "$config" = - ] || IFS=, read -ra settings <<< "$config"
  n=$((n + 1))
  log="$out/$n-$(echo "$config" | tr -c 'A-Za-z0-9_.-' '_')"
  env "${settings[@]}" $ernie serve "$model" --load-format dummy --port 8201 > "$log.serve.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    curl -sf http://127.0.0.1:8201/health > /dev/null && break
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  if ! curl -sf http://127.0.0.1:8201/health > /dev/null; then
    echo "== $config: server did not start"; tail -20 "$log.serve.log"; rc=1; continue
  fi
  for r in $(seq "${SERVE_AB_REPEAT:-3}"); do
    # shellcheck disable=SC2086
    $ernie bench serve --model "$model" --host 127.0.0.1 --port 8201 $bench_args --ignore-eos \
      --disable-tqdm > "$log.bench$r.txt" 2>&1 || rc=1
    echo "== $config, run $r: $(grep -E 'Output token throughput|Mean TTFT|Mean TPOT' \
      "$log.bench$r.txt" | sed -E 's/  +/ /g' | tr '\n' ';')"
  done
  kill -INT $server; wait $server
done
exit $rc
