"""A/B of two commits on the masked-CE benchmark, alternating in one run.

``python -m benchmarks.ab --base REV --head REV --shapes S1,S2 --scenarios plain,xtf-step``
checks both commits out (detached git worktrees under ``--workdir``), then for every round runs
``python -m benchmarks.masked_ce --interleave`` once per commit (the order alternates between
rounds), each run timing its method beside the three-GEMM floor in one process. Both commits
run the same harness (this checkout's ``benchmarks/masked_ce``, copied once), so only the
package differs. It reports, per
shape and scenario, the median time of each commit and the median of its per-run ratios to the
floor (robust to a load change between runs), writes ``ab-<tag>.csv`` and a plot.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _tree(rev: str, workdir: Path) -> tuple[str, Path]:
    """(full sha, a detached worktree of ``rev``), created once per sha."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    path = workdir / f"xtf-ab-{sha[:12]}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha],
                       capture_output=True, text=True, check=True)
    return sha, path


def _harness(workdir: Path) -> Path:
    """A folder holding a copy of this checkout's ``benchmarks`` package (and nothing else)."""
    dst = workdir / "xtf-ab-harness"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(ROOT / "benchmarks", dst / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    return dst


def _run(tree: Path, args: argparse.Namespace, out: Path, harness: Path) -> list[dict]:
    """One benchmark run of the package in ``tree`` (the harness from ``harness``): its CSV rows."""
    cmd = [sys.executable, "-m", "benchmarks.masked_ce", "--interleave", "--device", "cpu",
           "--reps", str(args.reps), "--shapes", args.shapes, "--scenarios", args.scenarios,
           "--methods", f"{args.floor},{args.method}", "--out", str(out), "--tag", "ab"]
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, PYTHONPATH=f"{harness}{os.pathsep}{tree}")
    res = subprocess.run(cmd, cwd=harness, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"benchmark run in {tree} failed:\n{res.stderr[-3000:]}")
    (path,) = out.glob("*-ab.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if not r.get("shape", "").startswith("#")]
    path.unlink()
    return rows


def _summary(runs: dict[str, list[list[dict]]], method: str, floor_method: str) -> list[dict]:
    """Per (shape, scenario): each commit's median time and median ratio to the floor."""
    out: dict[tuple[str, str], dict] = {}
    for label, rounds in runs.items():
        for rows in rounds:
            floor = {r["shape"]: float(r["total_s"]) for r in rows if r["method"] == floor_method}
            for r in rows:
                if r["method"] != method or not r["total_s"]:
                    continue
                d = out.setdefault((r["shape"], r["scenario"]), {"shape": r["shape"], "scenario": r["scenario"]})
                d.setdefault(f"{label}_s", []).append(float(r["total_s"]))
                d.setdefault(f"{label}_ratio", []).append(float(r["total_s"]) / floor[r["shape"]])
    rows = []
    for d in out.values():
        row = {"shape": d["shape"], "scenario": d["scenario"], "method": method}
        for label in runs:
            row[f"{label}_s"] = statistics.median(d[f"{label}_s"])
            row[f"{label}_x_floor"] = statistics.median(d[f"{label}_ratio"])
        row["change_pct"] = 100.0 * (row["head_x_floor"] / row["base_x_floor"] - 1.0)
        row["runs"] = len(d["head_s"])
        rows.append(row)
    return rows


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['shape']}\n{r['scenario']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    ax.bar([x - 0.2 for x in xs], [r["base_x_floor"] for r in rows], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [r["head_x_floor"] for r in rows], 0.4, label="head")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("time / three-GEMM floor (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the reference commit")
    ap.add_argument("--head", default="HEAD", help="the commit under test (default HEAD)")
    ap.add_argument("--shapes", default="S1,S2")
    ap.add_argument("--scenarios", default="plain,xtf-step")
    ap.add_argument("--method", default="xtf-native")
    ap.add_argument("--floor", default="gemm-floor", help="the floor method the ratios are taken to")
    ap.add_argument("--rounds", type=int, default=2, help="runs per commit (alternating)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repeats inside each run")
    ap.add_argument("--quick", action="store_true", help="the benchmark's tiny shapes (Q1, Q2): a dry run")
    ap.add_argument("--tag", default="ab")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.reps < 1:
        ap.error("--rounds / --reps: expected >= 1")
    trees = {label: _tree(rev, Path(args.workdir)) for label, rev in (("base", args.base), ("head", args.head))}
    runs: dict[str, list[list[dict]]] = {"base": [], "head": []}
    harness = _harness(Path(args.workdir))
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            order = ("base", "head") if k % 2 == 0 else ("head", "base")
            for label in order:
                print(f"round {k + 1}/{args.rounds}: {label} {trees[label][0][:10]}", file=sys.stderr, flush=True)
                runs[label].append(_run(trees[label][1], args, Path(tmp), harness))
    rows = _summary(runs, args.method, args.floor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ab-{args.tag}.csv"
    with open(path, "w", newline="") as f:
        f.write(f"# base {trees['base'][0]}  head {trees['head'][0]}  rounds {args.rounds} reps {args.reps}\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(f"{r['shape']:<6}{r['scenario']:<10} base {r['base_s']:.3f}s ({r['base_x_floor']:.3f}x)  "
              f"head {r['head_s']:.3f}s ({r['head_x_floor']:.3f}x)  change {r['change_pct']:+.1f}%")
    _plot(rows, out / f"ab-{args.tag}.png", f"{args.method}: {trees['base'][0][:8]} vs {trees['head'][0][:8]}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
