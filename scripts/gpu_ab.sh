#!/usr/bin/env bash
# On the GPU machine: build the CUDA tests and the kernel bench, then run both under each given
# configuration of environment switches, so that one build compares a new kernel path with the
# one it would replace. Usage: scripts/gpu_ab.sh DIR CONFIG...; a CONFIG is a comma-separated
# list of NAME=VALUE settings ("-" for none), e.g.
#   AB_FILTER='*Attention*' AB_BENCH=ops scripts/gpu_ab.sh out - ERNIE_NEW_PATH=0
# AB_FILTER is the gtest filter (default every test; "none" skips the tests), AB_BENCH the
# kernel bench section (ops, steps, all; "none" skips it), AB_PICK a regex for the bench lines
# to print (default every timing line), AB_CASES the bench's SEQSxCTX cases (default its own),
# AB_TIMEOUT the seconds the tests may take (default 400), AB_BIN a directory of binaries
# (ernie_cuda_tests, ernie_kernel_bench) built elsewhere for sm_90a with the same CUDA version,
# run instead of building here (it saves the build's minutes of GPU time; the golden fixtures
# are read from this tree).
# Logs go under DIR, one pair of files per config, numbered in order.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-ab-results}")
shift || true
mkdir -p "$out"
tests=build-gpu/tests/ernie_cuda_tests
bench=build-gpu/ernie_kernel_bench
if [ -n "${AB_BIN:-}" ]; then
  tests=$AB_BIN/ernie_cuda_tests
  bench=$AB_BIN/ernie_kernel_bench
  export ERNIE_GOLDEN_DIR=$PWD/tests/golden
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if ldd "$tests" "$bench" | grep "not found"; then
    echo "AB_BIN: libraries missing (above)"
    exit 1
  fi
else
  if [ ! -f build-gpu/build.ninja ]; then
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 ||
      { tail -30 "$out/configure.log"; exit 1; }
  fi
  cmake --build build-gpu -j "$(nproc)" --target ernie_cuda_tests ernie_kernel_bench \
    > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
  echo "built (${SECONDS}s)"
fi
filter=${AB_FILTER:-*}
section=${AB_BENCH:-all}
pick=${AB_PICK:-.}
rc=0
n=0
for config in "$@"; do
  settings=()
  [ "$config" = - ] || IFS=, read -ra settings <<< "$config"
  n=$((n + 1))  # the same config twice (before and after) keeps both logs
  log="$out/$n-$(echo "$config" | tr -c 'A-Za-z0-9_.-' '_')"
  if [ "$filter" != none ]; then
    env "${settings[@]}" timeout "${AB_TIMEOUT:-400}" "$tests" \
      --gtest_filter="$filter" > "$log.tests.log" 2>&1
    t=$?
    [ $t = 0 ] || rc=1
    echo "== $config: tests rc=$t, $(grep -cE '^\[       OK' "$log.tests.log") passed;" \
      "failed: $(grep -E '^\[  FAILED  \] [A-Za-z]' "$log.tests.log" | sort -u | tr '\n' ' ')" \
      "(${SECONDS}s)"
  fi
  if [ "$section" != none ]; then
    echo "== $config: kernel bench $section"
    env "${settings[@]}" timeout 300 "$bench" 20 "$section" ${AB_CASES:-} \
      > "$log.bench.txt" 2>&1 || rc=1
    grep -E "$pick" "$log.bench.txt"
    echo "(${SECONDS}s)"
  fi
done
exit $rc
