"""Results out: device name and versions, ratios to the GEMM floor, the CSV and the printed table."""

from __future__ import annotations

import csv
import os
import platform
import re
from dataclasses import asdict
from pathlib import Path

from .shapes import FLOORS, Result


def device_name(device: str) -> str:
    """A file-name-safe device name: the GPU's name or the CPU model."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{os.cpu_count()}core-{name}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def versions() -> dict[str, str]:
    """Versions of torch, xtf_kernels and the peers (``-`` when absent)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "xtf-kernels", "cut-cross-entropy", "liger-kernel", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def reference_floors(results: list[Result]) -> dict[str, Result]:
    """``{shape: the floor result its ratios are taken to}``: the first of FLOORS measured for
    the shape (and timed)."""
    floors = {}
    for m in reversed(FLOORS):
        floors.update({r.shape: r for r in results if r.method == m and r.total_s})
    return floors


def scaled_floor(floor_s: float, r: Result, floor: Result) -> float:
    """The floor's seconds scaled to ``r``'s kept rows (the floor is linear in them)."""
    return floor_s * max(r.kept_rows, 1) / floor.kept_rows


def add_ratios(results: list[Result]) -> None:
    """Ratio of every method's fwd+bwd time to the GEMM floor of its shape (scaled to its kept rows)."""
    floors = reference_floors(results)
    for r in results:
        f = floors.get(r.shape)
        if f and r.total_s and f.kept_rows:
            fl = scaled_floor(f.total_s, r, f)
            r.extra["floor_s"] = fl
            r.extra["ratio_floor"] = r.total_s / fl
            if "ratio_rounds" in r.extra:  # interleaved: the median of same-round ratios
                r.extra["ratio_floor"] = r.extra["ratio_rounds"] * f.kept_rows / max(r.kept_rows, 1)


def write_csv(results: list[Result], path: Path, meta: dict) -> None:
    """One row per result, with the device / versions / load average columns repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [
        "device",
        "torch",
        "xtf_kernels",
        "cut_cross_entropy",
        "liger_kernel",
        "threads",
        "loadavg_start",
        "shape",
        "N",
        "D",
        "V",
        "dtype",
        "scenario",
        "method",
        "kept_rows",
        "fwd_s",
        "bwd_s",
        "total_s",
        "floor_s",
        "ratio_floor",
        "peak_mb",
        "reps",
        "note",
        "inputs",
        "grad_filter",
    ]
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols)
        wr.writeheader()
        for r in results:
            row = {k: v for k, v in asdict(r).items() if k in cols}
            row.update(meta)
            row["floor_s"] = r.extra.get("floor_s")
            row["ratio_floor"] = r.extra.get("ratio_floor")
            row["inputs"] = r.extra.get("inputs", "")
            row["grad_filter"] = r.extra.get("grad_filter", "")
            for k in ("fwd_s", "bwd_s", "total_s", "floor_s", "ratio_floor", "peak_mb"):
                if row[k] is not None:
                    row[k] = f"{row[k]:.4g}"
            wr.writerow(row)


#: columns of the per-round CSV of an interleaved run (:func:`write_rounds_csv`)
ROUND_COLS = ["device", "torch", "xtf_kernels", "threads", "shape", "dtype", "scenario", "method",
              "kept_rows", "round", "fwd_s", "bwd_s", "total_s", "floor_s", "ratio_floor"]


def write_rounds_csv(results: list[Result], path: Path, meta: dict) -> int:
    """An interleaved run's every round, a row each: the case's forward / backward / total
    seconds, the same round's floor scaled to the case's kept rows, and their ratio (what
    ``python -m benchmarks.pool_rounds`` pools over runs). Returns the number of rows written."""
    floors = reference_floors(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=ROUND_COLS, extrasaction="ignore")
        wr.writeheader()
        for r in results:
            f = floors.get(r.shape)
            fl = [a + b for a, b in f.extra.get("rounds") or []] if f is not None else []
            for i, (a, b) in enumerate(r.extra.get("rounds") or []):
                row = {**meta, "shape": r.shape, "dtype": r.dtype, "scenario": r.scenario, "method": r.method,
                       "kept_rows": r.kept_rows, "round": i, "fwd_s": f"{a:.5g}", "bwd_s": f"{b:.5g}",
                       "total_s": f"{a + b:.5g}", "floor_s": "", "ratio_floor": ""}
                if f is not None and f.kept_rows and i < len(fl):
                    floor_s = scaled_floor(fl[i], r, f)
                    row["floor_s"], row["ratio_floor"] = f"{floor_s:.5g}", f"{(a + b) / floor_s:.5g}"
                wr.writerow(row)
                n += 1
    return n


def print_table(results: list[Result]) -> str:
    """The results as an aligned text table (also returned)."""
    head = f"{'shape':<11}{'scenario':<10}{'method':<20}{'kept':>6}{'fwd s':>9}{'bwd s':>9}{'total s':>9}{'x floor':>9}{'peak MB':>9}  note"
    lines = [head, "-" * len(head)]
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
    for r in results:
        lines.append(
            f"{r.shape:<11}{r.scenario:<10}{r.method:<20}{r.kept_rows:>6}{fmt(r.fwd_s):>9}{fmt(r.bwd_s):>9}"
            f"{fmt(r.total_s):>9}{fmt(r.extra.get('ratio_floor'), 2):>9}{fmt(r.peak_mb, 0):>9}  {r.note or r.extra.get('inputs', '')}"
            + (f" [{r.extra['grad_filter']}]" if "grad_filter" in r.extra else "")
        )
    text = "\n".join(lines)
    print(text)
    return text


def read_csv(path: Path) -> list[Result]:
    """The results of a CSV :func:`write_csv` wrote (times, memory, notes; the ratio to the
    floor and the gradient-filter line back in ``extra``), e.g. to plot them elsewhere."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):

            def num(k, row=row):
                return float(row[k]) if row.get(k) not in (None, "") else None

            r = Result(
                row["shape"],
                int(row["N"]),
                int(row["D"]),
                int(row["V"]),
                row["dtype"],
                row["scenario"],
                row["method"],
                kept_rows=int(row["kept_rows"] or 0),
                fwd_s=num("fwd_s"),
                bwd_s=num("bwd_s"),
                total_s=num("total_s"),
                peak_mb=num("peak_mb"),
                reps=int(row["reps"] or 0),
                note=row["note"],
            )
            for k in ("floor_s", "ratio_floor"):
                if num(k) is not None:
                    r.extra[k] = num(k)
            for k in ("inputs", "grad_filter"):
                if row.get(k):
                    r.extra[k] = row[k]
            out.append(r)
    return out
