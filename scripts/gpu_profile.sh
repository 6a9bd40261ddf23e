#!/usr/bin/env bash
# On the GPU machine, after a build (scripts/gpu_check.sh): where one decode step of the 21B
# model spends its time, kernel by kernel. Runs `ernie_kernel_bench 3 steps CASE` under Nsight
# Compute (only the profiler range around one graph replay; no cache flush, clocks left alone)
# and prints each kernel's time summed by name, largest first. Each kernel is timed in
# isolation, so the sum exceeds the step's graph time (small kernels read 1.4-2x their share):
# use it to rank kernels. One profile per case.
#   scripts/gpu_profile.sh [RESULT_DIR] [CASES, default 1x1000]
# CASES is e.g. "1x1000,16x8500" (sequences x context, as ernie_kernel_bench lists them).
# With ERNIE_NCU_KERNEL=REGEX it instead profiles the first launch of the matching kernel in
# `ernie_kernel_bench 1 ops` with every Nsight Compute section (throughput, warp stall
# reasons, memory) into RESULT_DIR/ncu_kernel.txt, e.g.
#   ERNIE_NCU_KERNEL=prefill_attention_wgmma scripts/gpu_profile.sh DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-results}")
cases=${2:-1x1000}
mkdir -p "$out"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if [ -n "${ERNIE_NCU_KERNEL:-}" ]; then
  "$ncu" --set full --kernel-name "regex:$ERNIE_NCU_KERNEL" --launch-count 1 \
    build-gpu/ernie_kernel_bench 1 ops > "$out/ncu_kernel.txt" 2>&1
  rc=$?
  grep -E "^  [A-Za-z]|Duration|Throughput|Stall|Warp Cycles|Issued|Registers|Occupancy" \
    "$out/ncu_kernel.txt" | head -80
  exit $rc
fi
rc=0
for c in ${cases//,/ }; do
  csv="$out/ncu_step_$c.csv"
  "$ncu" --profile-from-start off --cache-control none --clock-control none \
    --metrics gpu__time_duration.sum --csv --page raw \
    build-gpu/ernie_kernel_bench 3 steps "$c" > "$csv" 2> "$out/ncu_step_$c.log" || rc=1
  grep "decode step" "$csv"
  python3 - "$csv" <<'PY'
import csv, collections, re, sys
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
table = list(csv.DictReader(rows))
time_col = next(c for c in table[0] if c.startswith("gpu__time_duration"))
unit, data = table[0][time_col], table[1:]  # the first row under the header holds units
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[unit]
sums, counts = collections.defaultdict(float), collections.Counter()
for r in data:
    name = re.sub(r"\(.*", "", r["Kernel Name"])[:70]
    sums[name] += float(r[time_col].replace(",", "")) * scale
    counts[name] += 1
total = sum(sums.values())
print(f"{len(data)} kernels, {total:.1f} us summed (unit {unit})")
for name, us in sorted(sums.items(), key=lambda kv: -kv[1]):
    print(f"{us:9.1f} us {100 * us / total:5.1f}%  x{counts[name]:<4d} {us / counts[name]:7.2f} us  {name}")
PY
done
exit $rc
