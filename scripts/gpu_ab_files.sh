#!/usr/bin/env bash
# On the GPU machine: compare source files with baseline copies of them in one call, on one
# machine (H100s differ by 2-3%, so a baseline measured elsewhere does not compare). Builds and
# measures the working tree, then each FILE replaced by BASE_DIR/<its name>, then the working
# tree again (the two runs of it show the noise), and restores the files.
#   scripts/gpu_ab_files.sh OUT_DIR BASE_DIR FILE...
# Make BASE_DIR before sending the tree, e.g. for main's versions:
#   mkdir -p ab-base && git show main:src/backend/cuda/moe.cu > ab-base/moe.cu
# (the GPU machine's copy of .git may not hold the commits you have here). What each round
# runs: `ernie_kernel_bench 20 $AB_BENCH` (default steps) with the lines matching $AB_PICK
# (default the decode steps); with AB_SEED=1 also the seed benchmark (scripts/gpu_check.sh,
# tests off). Logs go under OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n 2,12p "$0"; exit 2; }
out=$(realpath -m "$1")
base=$(realpath "$2")
shift 2
files=("$@")
mkdir -p "$out/new"
for f in "${files[@]}"; do
  [ -f "$f" ] || { echo "no such file: $f"; exit 2; }
  [ -f "$base/$(basename "$f")" ] || { echo "no baseline $base/$(basename "$f")"; exit 2; }
  cp "$f" "$out/new/$(basename "$f")"
done
restore() { for f in "${files[@]}"; do cp "$out/new/$(basename "$f")" "$f"; done; }
trap restore EXIT
[ -f build-gpu/build.ninja ] ||
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 ||
  { tail -30 "$out/configure.log"; exit 1; }
section=${AB_BENCH:-steps}
pick=${AB_PICK:-decode step}
round() {
  local name=$1
  cmake --build build-gpu -j "$(nproc)" --target ernie_kernel_bench ernie > "$out/build_$name.log" 2>&1 ||
    { tail -30 "$out/build_$name.log"; return 1; }
  echo "== $name"
  timeout 300 build-gpu/ernie_kernel_bench 20 "$section" > "$out/bench_$name.txt" 2>&1
  grep -E "$pick" "$out/bench_$name.txt"
  if [ "${AB_SEED:-0}" != 0 ]; then
    ERNIE_GPU_TESTS=0 scripts/gpu_check.sh "$out/seed_$name" 2>&1 |
      grep -E "Output token throughput|Mean TTFT|Mean TPOT|Median ITL"
  fi
}
round new
for f in "${files[@]}"; do cp "$base/$(basename "$f")" "$f"; done
round base
restore
round new-again
