#!/usr/bin/env bash
# On the GPU machine: build everything with CUDA (sm_90a) using all cores, run every test
# (GPU kernel, backend and golden tests included; the Python suites too when their packages are
# importable), then the seed benchmark from docs/performance.md (21B config, dummy weights,
# 16 x 8000/1000 at 10 requests/s; ERNIE_SERVE_ARGS adds serve flags). Logs go under
# ${1:-gpu-results}; the result block is
# printed last. ERNIE_GPU_BENCH=0 skips the benchmark; ERNIE_GPU_TESTS=0 skips the tests;
# ERNIE_KERNEL_BENCH=1 adds per-op timings against their floors (ernie_kernel_bench);
# ERNIE_GPU_BENCH_MORE=1 adds the issue's other two targets against the same server after the
# seed benchmark (one prompt of 1000/1000, then 256 prompts of 1000/1000 at rate inf; not each
# the first benchmark after a start).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-results}")
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
gen=Ninja; command -v ninja >/dev/null || gen="Unix Makefiles"
cmake -S . -B build-gpu -G "$gen" -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 || { cat "$out/configure.log"; exit 1; }
targets=()  # everything, unless the tests are off: then only what runs below
if [ "${ERNIE_GPU_TESTS:-1}" = 0 ]; then
  targets=(--target ernie)
  [ "${ERNIE_KERNEL_BENCH:-0}" != 0 ] && targets+=(ernie_kernel_bench)
fi
cmake --build build-gpu -j "$(nproc)" "${targets[@]}" > "$out/build.log" 2>&1 ||
  { tail -50 "$out/build.log"; exit 1; }
ernie=build-gpu/ernie
rc=0

if [ "${ERNIE_GPU_TESTS:-1}" != 0 ]; then
  build-gpu/tests/ernie_cuda_tests 2>&1 > "$out/cuda_tests.log"
  rc=$?
  grep -E "^\[ golden|FAILED|PASSED|Failure|error" "$out/cuda_tests.log" | head -40
  # The Python suites need the test packages. The GPU machine has no package registry: use
  # the system Python when it has them, else wheels brought along in .wheels/ (pip download
  # for its Python), else skip them. The server then runs on the GPU (--device auto).
  skip="tokenizer_vs|chat_templates|schemathesis|cuda"
  have=0
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import openai, httpx, pytest" 2>/dev/null; then
    have=1
  elif python3 -c "import openai, httpx, pytest" 2>/dev/null; then
    mkdir -p .venv/bin && ln -sf "$(command -v python3)" .venv/bin/python && have=1
  elif [ -d .wheels ] && python3 -m venv .venv >/dev/null 2>&1 &&
       .venv/bin/pip install -q --no-index --find-links .wheels openai httpx pytest \
         > "$out/pip.log" 2>&1; then
    have=1
  fi
  if [ "$have" = 0 ]; then
    echo "(python suites skipped: openai/httpx/pytest not importable)"
    skip="$skip|server_|bench_serve"
  fi
  (cd build-gpu && ctest -j 8 --output-on-failure -E "$skip" > "$out/ctest.log" 2>&1) || rc=1
  tail -6 "$out/ctest.log"
fi

if [ "${ERNIE_KERNEL_BENCH:-0}" != 0 ]; then
  timeout 300 build-gpu/ernie_kernel_bench 20 2>&1 | tee "$out/kernel_bench.txt"
fi

if [ "${ERNIE_GPU_BENCH:-1}" != 0 ]; then
  model=/tmp/ernie-21b
  rm -rf "$model"
  $ernie make-model --preset 21b-a3b --no-weights --out "$model" > "$out/make_model.log" 2>&1
  $ernie serve "$model" --load-format dummy --port 8200 ${ERNIE_SERVE_ARGS:-} > "$out/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    curl -sf http://127.0.0.1:8200/health > /dev/null && break
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  if curl -sf http://127.0.0.1:8200/health > /dev/null; then
    grep -E "GPU memory|KV cache|weights|Captured" "$out/serve.log"
    $ernie bench serve --model "$model" --host 127.0.0.1 --port 8200 --dataset-name random \
      --random-input-len 8000 --random-output-len 1000 --request-rate 10 --num-prompts 16 \
      --ignore-eos --disable-tqdm > "$out/bench.txt" 2>&1 || rc=1
    if [ "${ERNIE_GPU_BENCH_MORE:-0}" != 0 ]; then
      for run in "1 1" "256 inf"; do
        set -- $run
        $ernie bench serve --model "$model" --host 127.0.0.1 --port 8200 --dataset-name random \
          --random-input-len 1000 --random-output-len 1000 --request-rate "$2" --num-prompts "$1" \
          --ignore-eos --disable-tqdm > "$out/bench_$1.txt" 2>&1 || rc=1
      done
    fi
    kill -INT $server; wait $server
    cat "$out/bench.txt"
    for f in "$out"/bench_*.txt; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done
  else
    echo "server did not start:"; tail -30 "$out/serve.log"; kill $server 2>/dev/null; rc=1
  fi
fi
exit $rc
