"""``python -m benchmarks.masked_ce``: the command line (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cases import plan
from .measure import _child, measure_interleaved, run_cases
from .plots import plot
from .report import add_ratios, device_name, print_table, versions, write_csv, write_rounds_csv
from .shapes import CPU_SHAPES, GPU_SHAPES, QUICK_SHAPES, Case

DESCRIPTION = "Fused masked cross-entropy, side by side with the tools users would pick instead."
#: default output directory: benchmarks/results
RESULTS = Path(__file__).resolve().parent.parent / "results"


def select(cases: list[Case], methods: str | None, scenarios: str | None) -> list[Case]:
    """The cases of the comma-separated ``methods`` and ``scenarios`` (None: all). With
    ``methods``, in that order, the plain scenario first (what matters first when a time limit
    cuts the run short); without, in plan order."""
    if methods:
        order = {m: i for i, m in enumerate(methods.split(","))}
        cases = sorted(
            (c for c in cases if c.method in order),
            key=lambda c: (c.scenario != "plain", order[c.method]),
        )
    if scenarios:
        keep = set(scenarios.split(","))
        cases = [c for c in cases if c.scenario in keep]
    return cases


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see the module docstring). Returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.masked_ce", description=DESCRIPTION)
    ap.add_argument(
        "--quick", action="store_true", help="tiny shapes, 2 repeats, one subprocess (CI smoke)"
    )
    ap.add_argument(
        "--shapes", default=None, help="comma-separated shape names (default: all for the device)"
    )
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods to keep, run in this order, plain scenario first (default: all, in plan order)",
    )
    ap.add_argument(
        "--scenarios", default=None, help="comma-separated scenarios to keep (default: all)"
    )
    ap.add_argument(
        "--reps", type=int, default=None, help="timed repeats per case (default 3, quick 2)"
    )
    ap.add_argument(
        "--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available"
    )
    ap.add_argument(
        "--out", default=str(RESULTS), help="output directory for <device>.csv and the PNG plots"
    )
    ap.add_argument("--tag", default="", help="suffix of the output file names (a partial re-run)")
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="time every case in this process, round-robin (--reps rounds): ratios to the "
        "floor that a changing machine load cannot skew; no peak memory",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    ap.add_argument(
        "--case-timeout",
        type=float,
        default=None,
        help="seconds per case: a child that runs past it is killed, the case noted as "
        "timed out, and a new child runs the cases after it (default: no limit)",
    )
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child is not None:
        _child(args._child)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.reps is not None and args.reps < 1:
        ap.error("--reps: expected >= 1")
    for name in ("timeout", "case_timeout"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')}: expected seconds > 0")
    table = QUICK_SHAPES if args.quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    names = args.shapes.split(",") if args.shapes else list(table)
    bad = [n for n in names if n not in table]
    if bad:
        ap.error(f"--shapes: unknown {bad}; expected names from {list(table)}")
    reps = args.reps or (2 if args.quick else 3)
    cases = plan([table[n] for n in names], device, reps, quick=args.quick)
    cases = select(cases, args.methods, args.scenarios)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dev = (
        device_name(device)
        + ("-quick" if args.quick else "")
        + (f"-{args.tag}" if args.tag else "")
    )
    vs = versions()
    meta = {
        "device": dev,
        "torch": vs["torch"],
        "xtf_kernels": vs["xtf-kernels"],
        "cut_cross_entropy": vs["cut-cross-entropy"],
        "liger_kernel": vs["liger-kernel"],
        "threads": torch.get_num_threads(),
        "loadavg_start": f"{load:.2f}",
    }
    print(f"device {dev}; load average at start {load:.2f}; versions {vs}", file=sys.stderr)
    # isolate every case on CPU (peak RSS per process); on GPU memory is measured per case anyway
    isolate = device == "cpu" and not args.quick
    if args.interleave:
        results = measure_interleaved(cases, device, reps)
    else:
        results = run_cases(cases, device, isolate, args.timeout, args.case_timeout)
    add_ratios(results)
    print_table(results)
    out = Path(args.out)
    write_csv(results, out / f"{dev}.csv", meta)
    if args.interleave:  # every round too, to pool runs (python -m benchmarks.pool_rounds)
        write_rounds_csv(results, out / f"{dev}-rounds.csv", meta)
    paths = plot(results, out, dev)
    print(f"wrote {out / (dev + '.csv')} and {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0
