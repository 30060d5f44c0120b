"""Pool the rounds of several interleaved runs: one ratio to the GEMM floor per method, with its spread.

``python -m benchmarks.pool_rounds RUN-rounds.csv [RUN-rounds.csv ...] [--out DIR] [--name NAME]
[--target 1.05]``

An interleaved run (``python -m benchmarks.masked_ce --interleave``) times every method once per
round beside the GEMM floor and writes each round to ``<device>[-<tag>]-rounds.csv``. On a
machine whose speed drifts, one run's median can move by more than the differences that matter
(5 % here), so a claim needs many rounds: this script pools the same-round ratios of any number
of runs and reports, per (device, shape, dtype, scenario, method) (runs of different code need
different method names: the files keep whatever the run wrote),

* ``rounds`` and ``runs``: how many ratios were pooled, from how many files;
* ``median``: the pooled median of the same-round ratios ``total_s / floor_s``;
* ``ci_lo`` / ``ci_hi``: a 95 % bootstrap interval of that median, resampling runs and then the
  rounds within each (a run's drift moves all its rounds, so rounds are not independent across
  runs; with one file, the rounds alone; fixed seed);
* ``q25`` / ``q75``: the quartiles of the ratios (the round-to-round spread);
* ``run_medians``: each file's own median, to see how far single runs disagree;
* ``meets_target``: whether the upper end of the interval is at most ``--target`` (with
  ``--target``).

Writes ``<out>/<name>.csv`` and ``<out>/<name>.png`` (the ratios of every round, per method,
with the pooled medians, their intervals and the target) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
from pathlib import Path

from .masked_ce.shapes import FLOORS

HERE = Path(__file__).resolve().parent
#: columns a rounds CSV must have
NEEDED = ("device", "shape", "dtype", "scenario", "method", "round", "ratio_floor")
Key = tuple[str, str, str, str, str]
OUT_COLS = ["device", "shape", "dtype", "scenario", "method", "rounds", "runs", "median", "ci_lo", "ci_hi", "q25", "q75",
            "run_medians", "target", "meets_target"]


class PoolError(ValueError):
    """A rounds file that cannot be pooled (missing, not a rounds CSV, no ratios)."""


def read_rounds(paths: list[Path]) -> dict[Key, list[tuple[int, float]]]:
    """``{(device, shape, dtype, scenario, method): [(file index, ratio), ...]}`` over the files
    (rows without a ratio, e.g. of a shape whose floor was not run, are left out)."""
    out: dict[Key, list[tuple[int, float]]] = {}
    seen = [p.resolve() for p in paths]
    dup = sorted({str(p) for p in seen if seen.count(p) > 1})
    if dup:
        raise PoolError(f"{dup[0]}: given more than once (each run counts once)")
    for i, path in enumerate(paths):
        if not path.is_file():
            raise PoolError(f"{path}: no such file")
        with open(path, newline="") as fh:
            rd = csv.DictReader(fh)
            missing = [c for c in NEEDED if c not in (rd.fieldnames or [])]
            if missing:
                raise PoolError(f"{path}: not a rounds CSV of benchmarks.masked_ce --interleave "
                                f"(missing columns {missing})")
            for row in rd:
                if row["ratio_floor"]:
                    key = (row["device"], row["shape"], row["dtype"], row["scenario"], row["method"])
                    out.setdefault(key, []).append((i, float(row["ratio_floor"])))
    if not any(k[4] not in FLOORS for k in out):
        raise PoolError("no ratios to the floor in the given files (was a floor method in the runs?)")
    return out


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile of ``xs`` (``q`` in [0, 1])."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap_median_ci(runs: list[list[float]], *, reps: int = 4000, level: float = 0.95, seed: int = 0
                        ) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled median of the ``runs`` (lists of ratios):
    each resample draws as many runs with replacement, then each drawn run's rounds with
    replacement (one run: its rounds alone). ``reps`` resamples, seeded."""
    rng = random.Random(seed)
    meds = []
    for _ in range(reps):
        drawn = rng.choices(runs, k=len(runs)) if len(runs) > 1 else runs
        meds.append(statistics.median(x for r in drawn for x in rng.choices(r, k=len(r))))
    a = (1.0 - level) / 2.0
    return _quantile(meds, a), _quantile(meds, 1.0 - a)


def pool(data: dict[Key, list[tuple[int, float]]], target: float | None) -> list[dict]:
    """One summary row per (device, shape, dtype, scenario, method) but the floors' (see the
    module docstring)."""
    rows = []
    for (device, shape, dtype, scenario, method), pairs in data.items():
        if method in FLOORS:  # the floors' own rows: ratio 1 by definition
            continue
        xs = [r for _, r in pairs]
        files = sorted({i for i, _ in pairs})
        runs = [[r for i, r in pairs if i == f] for f in files]
        lo, hi = bootstrap_median_ci(runs)
        per_run = [statistics.median(r) for r in runs]
        rows.append({
            "device": device, "shape": shape, "dtype": dtype, "scenario": scenario, "method": method,
            "rounds": len(xs), "runs": len(files),
            "median": statistics.median(xs), "ci_lo": lo, "ci_hi": hi,
            "q25": _quantile(xs, 0.25), "q75": _quantile(xs, 0.75),
            "run_medians": " ".join(f"{m:.3f}" for m in per_run),
            "target": "" if target is None else target,
            "meets_target": "" if target is None else hi <= target,
        })
    return rows


def write(rows: list[dict], data, out: Path, name: str, target: float | None) -> list[Path]:
    """The summary CSV and the plot; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{name}.csv"
    with open(csv_path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=OUT_COLS)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.2))
    for j, r in enumerate(rows):
        xs = [x for _, x in data[(r["device"], r["shape"], r["dtype"], r["scenario"], r["method"])]]
        jit = [j + 0.25 * ((k * 0.618) % 1.0 - 0.5) for k in range(len(xs))]
        ax.scatter(jit, xs, s=8, alpha=0.45, color="0.4")
        ax.errorbar([j], [r["median"]], yerr=[[r["median"] - r["ci_lo"]], [r["ci_hi"] - r["median"]]],
                    fmt="o", color="C0", capsize=6, lw=2)
    ax.axhline(1.0, color="k", lw=0.8)
    if target is not None:
        ax.axhline(target, color="r", lw=0.8, ls="--", label=f"target {target:g}x floor")
        ax.legend(loc="upper right")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['method']}\n{r['shape']} {r['scenario']}" for r in rows], fontsize=8)
    ax.set_ylabel("time / GEMM floor, same round")
    ax.set_title(f"{name}: every round (grey), pooled median and 95 % interval (blue)", fontsize=9)
    fig.tight_layout()
    png = out / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [csv_path, png]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see the module docstring). Returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pool_rounds",
                                 description="Pool the same-round ratios to the GEMM floor of interleaved runs.")
    ap.add_argument("files", nargs="+", type=Path, help="rounds CSVs (<device>[-<tag>]-rounds.csv)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    ap.add_argument("--name", default="pooled", help="output file stem (default: pooled)")
    ap.add_argument("--target", type=float, default=None, help="a ratio the upper interval end is checked against")
    args = ap.parse_args(argv)
    if args.target is not None and not args.target > 0:
        ap.error("--target: expected a ratio > 0")
    try:
        data = read_rounds(args.files)
    except PoolError as exc:
        ap.error(str(exc))
    rows = pool(data, args.target)
    paths = write(rows, data, args.out, args.name, args.target)
    print(f"{'shape':<8}{'scenario':<10}{'method':<20}{'rounds':>7}{'median':>8}{'95% CI':>16}  per run")
    for r in rows:
        ci = f"[{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"
        print(f"{r['shape']:<8}{r['scenario']:<10}{r['method']:<20}{r['rounds']:>7}{r['median']:>8.3f}"
              f"{ci:>16}  {r['run_medians']}")
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
