#!/usr/bin/env python3
"""Lines up the GEMM tuner's picks of several kernel-bench processes with their step times.

Each LOG is the output of `ernie_kernel_bench N steps CASES` run under
VLLM_LOGGING_LEVEL=DEBUG (scripts/gpu_ab.sh writes one per configuration). Prints the step
times of each log, then every tuned shape whose pick differs between the logs (a pick is
cuBLAS's default or a cuBLASLt candidate's index), with the chosen and next-best times of
each, so that the picks of the slow processes can be told from those of the fast ones; with
--all, every shape. A shape whose chosen and next-best times are within 2% is marked as a
near tie.

    scripts/tune_picks.py ab/1-*.bench.txt ab/5-*.bench.txt
"""
import argparse
import re
import sys

STEP = re.compile(r"^(decode step, \d+ x \d+|mixed step, \S+)\s+([\d.]+) ms")
TUNE = re.compile(
    r"GEMM tuning (\d+) x (\d+) -> (\d+)( \(f32 out\))?: default ([\d.]+) us, "
    r"(kept|candidate (\d+) of \d+) ([\d.]+) us, next best ([\d.inf]+) us")


def parse(path):
    steps, picks = {}, {}
    with open(path, errors="replace") as f:
        for line in f:
            m = STEP.search(line)
            if m:
                steps[m.group(1)] = float(m.group(2))
                continue
            m = TUNE.search(line)
            if m:
                shape = f"{m.group(1)} x {m.group(2)} -> {m.group(3)}" + (" f32" if m.group(4) else "")
                pick = "default" if m.group(6) == "kept" else f"#{m.group(7)}"
                picks[shape] = (pick, float(m.group(8)), float(m.group(9)))
    return steps, picks


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--all", action="store_true", help="every shape, not only differing picks")
    args = ap.parse_args()
    runs = [(p, *parse(p)) for p in args.logs]
    if not any(picks for _, _, picks in runs):
        sys.exit("no tuning lines found: were the logs written under VLLM_LOGGING_LEVEL=DEBUG?")
    names = [f"[{i}]" for i in range(len(runs))]
    for name, (path, _, _) in zip(names, runs):
        print(f"{name} {path}")
    cases = sorted({c for _, steps, _ in runs for c in steps})
    print("\n| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(runs))
    for c in cases:
        cells = [f"{steps[c]:.3f}" if c in steps else "-" for _, steps, _ in runs]
        print(f"| {c} | " + " | ".join(cells) + " |")
    shapes = sorted({s for _, _, picks in runs for s in picks},
                    key=lambda s: [int(x) for x in re.findall(r"\d+", s)])
    print("\n| shape | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(runs))
    shown = 0
    for s in shapes:
        got = [picks.get(s) for _, _, picks in runs]
        if not args.all and len({g[0] if g else None for g in got}) <= 1:
            continue
        shown += 1
        cells = []
        for g in got:
            if g is None:
                cells.append("-")
                continue
            pick, kept, nxt = g
            tie = " (tie)" if nxt < kept * 1.02 else ""
            cells.append(f"{pick} {kept:.1f} / {nxt:.1f} us{tie}")
        print(f"| {s} | " + " | ".join(cells) + " |")
    if shown == 0:
        print("| (every shape got the same pick in every log) |" + " |" * len(runs))


if __name__ == "__main__":
    main()
