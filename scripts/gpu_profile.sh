#!/usr/bin/env bash
# On the GPU machine, after a build (scripts/gpu_check.sh): where one decode step of the 21B
# model spends its time, kernel by kernel. Runs `ernie_kernel_bench 3 steps CASE` under Nsight
# Compute (only the profiler range around one graph replay; no cache flush, clocks left alone)
# and prints each kernel's time summed by name, largest first. Each kernel is timed in
# isolation, so the sum exceeds the step's graph time (small kernels read 1.4-2x their share):
# use it to rank kernels. One profile per case.
#   scripts/gpu_profile.sh [RESULT_DIR] [CASES, default 1x1000]
# CASES is e.g. "1x1000,16x8500" (sequences x context, as ernie_kernel_bench lists them).
# With ERNIE_NCU_KERNEL=REGEX it instead profiles one launch of the matching kernel in
# `ernie_kernel_bench 1 ops` (the first, or the one after ERNIE_NCU_SKIP matching launches)
# with every Nsight Compute section (throughput, warp stall reasons, memory) into
# RESULT_DIR/ncu_kernel.txt; ERNIE_NCU_SOURCE=1 adds where its warps stall, instruction by
# instruction (RESULT_DIR/ncu_sass.csv, summarised by scripts/ncu_stalls.py), e.g.
#   ERNIE_NCU_KERNEL=prefill_attention_fa ERNIE_NCU_SOURCE=1 scripts/gpu_profile.sh DIR
# With ERNIE_NCU_OPS=1 it lists every launch of `ernie_kernel_bench 1 ops` (grid, block, time)
# into RESULT_DIR/ncu_ops.csv: which kernels an op (an MoE layer at 8192 tokens, say) runs and
# how long each takes alone. With ERNIE_NCU_CASE=CASE (e.g. 1x1000) as well, the kernel is taken
# from that decode step's graph replay instead (the graph's own launch configuration, e.g. the
# decode attention's key splits, which the op bench plans differently).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-results}")
cases=${2:-1x1000}
mkdir -p "$out"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if [ "${ERNIE_NCU_OPS:-0}" != 0 ]; then
  "$ncu" --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size --csv \
    --page raw build-gpu/ernie_kernel_bench 1 ops > "$out/ncu_ops.csv" 2> "$out/ncu_ops.log"
  rc=$?
  python3 - "$out/ncu_ops.csv" <<'PY'
import csv, re, sys
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
table = list(csv.DictReader(rows))
cols = {k: next(c for c in table[0] if c.startswith(k))
        for k in ("gpu__time_duration", "launch__grid_size", "launch__block_size")}
unit, data = table[0][cols["gpu__time_duration"]], table[1:]  # first row: units
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[unit]
print(f"{'launch':>6} {'grid':>8} {'block':>5} {'us':>9}  kernel")
for i, r in enumerate(data):
    us = float(r[cols["gpu__time_duration"]].replace(",", "")) * scale
    name = re.sub(r"\(.*", "", r["Kernel Name"])[:70]
    print(f"{i:6d} {r[cols['launch__grid_size']]:>8} {r[cols['launch__block_size']]:>5} "
          f"{us:9.1f}  {name}")
PY
  exit $rc
fi
if [ -n "${ERNIE_NCU_KERNEL:-}" ]; then
  report=()
  [ "${ERNIE_NCU_SOURCE:-0}" != 0 ] && report=(--import-source yes -o "$out/ncu_kernel" -f)
  target=(build-gpu/ernie_kernel_bench 1 ops)
  if [ -n "${ERNIE_NCU_CASE:-}" ]; then
    target=(--profile-from-start off build-gpu/ernie_kernel_bench 3 steps "$ERNIE_NCU_CASE")
  fi
  "$ncu" --set full --kernel-name "regex:$ERNIE_NCU_KERNEL" --launch-skip "${ERNIE_NCU_SKIP:-0}" \
    --launch-count 1 "${report[@]}" "${target[@]}" > "$out/ncu_kernel.txt" 2>&1
  rc=$?
  if [ ${#report[@]} -gt 0 ] && [ $rc = 0 ]; then
    "$ncu" -i "$out/ncu_kernel.ncu-rep" >> "$out/ncu_kernel.txt" 2>&1
    "$ncu" -i "$out/ncu_kernel.ncu-rep" --page source --csv --print-source sass \
      > "$out/ncu_sass.csv" 2>&1
    rm -f "$out/ncu_kernel.ncu-rep"
  fi
  grep -E "^  [A-Za-z]|Duration|Throughput|Stall|Warp Cycles|Issued|Registers|Occupancy" \
    "$out/ncu_kernel.txt" | head -80
  [ -s "$out/ncu_sass.csv" ] && python3 scripts/ncu_stalls.py "$out/ncu_sass.csv" 20
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
