#!/usr/bin/env python3
"""Where a kernel's warps stall, from Nsight Compute's per-instruction page.

Input: the output of `ncu -i REPORT --page source --csv --print-source sass` for a report taken
with `--set full --import-source yes` (scripts/gpu_profile.sh writes it with ERNIE_NCU_SOURCE=1).
Prints each stall reason's share of all warp samples, then the instructions with the most
samples and their two largest reasons.

Usage: ncu_stalls.py SASS_CSV [TOP]
"""
import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.reader(f))
    # The first row names the kernel; the header row starts with "Address".
    start = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if start is None:
        sys.exit(f"{sys.argv[1]}: no per-instruction table (ncu --page source --csv)")
    header, data = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = "Warp Stall Sampling (All Samples)"
    if samples not in col or not reasons:
        sys.exit(f"{sys.argv[1]}: no warp stall samples (profile with --set full)")
    totals = {r: sum(number(row[col[r]]) for row in data) for r in reasons}
    total = sum(totals.values())
    if total == 0:
        sys.exit(f"{sys.argv[1]}: no samples")
    if rows[0][:1] == ["Kernel Name"] and len(rows[0]) > 1:
        print(rows[0][1])
    print(f"{int(total)} warp samples over {len(data)} instructions")
    for reason, n in sorted(totals.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {reason[len('stall_'):]:<20} {100 * n / total:5.1f}%")
    print(f"top {top} instructions:")
    for row in sorted(data, key=lambda r: -number(r[col[samples]]))[:top]:
        share = 100 * number(row[col[samples]]) / total
        why = sorted(((number(row[col[r]]), r[len("stall_"):]) for r in reasons), reverse=True)[:2]
        why_text = ", ".join(f"{name} {int(n)}" for n, name in why if n > 0)
        print(f"  {row[col['Address']][-6:]} {share:5.1f}%  {row[col['Source']].strip()[:64]:<64}"
              f"  {why_text}")


if __name__ == "__main__":
    main()
