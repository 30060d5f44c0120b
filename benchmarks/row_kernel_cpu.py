"""The native row kernel alone: what the work between the GEMMs costs per logit on this CPU.

``python -m benchmarks.row_kernel_cpu [--rows 524] [--vocab 32000] [--reps 7] [--out benchmarks/results]``

Times one logits chunk ``[rows, vocab]`` fp32 (the S1 chunk of the default ``chunk_elems``:
524 rows x 32000) through the compiled kernels of every code path this CPU can run
(``XTF_NATIVE_ISA``: the host build, AVX-512, AVX2, the base ISA), with 1 and with all of
ATen's threads:

* ``stats``: the statistics of every row (``stats_and_grad`` with ``n_grad = 0``);
* ``stats+grad``: statistics and, in place, the gradient of every row (what a training step's
  forward runs per chunk).

Each repeat restores the chunk from a saved copy first (not timed), so every call starts from
logits in memory, as after the logits GEMM. Prints the medians (ms per chunk, ns per logit) and
writes ``<out>/row-kernel-<device>-<host ISA>.csv`` and a bar plot beside it.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _time(ext, z0, y, n_grad: int, reps: int) -> float:
    """Median seconds of one kernel call over ``reps`` repeats (the chunk restored between)."""
    z = z0.clone()
    ts = []
    for _ in range(reps):
        z.copy_(z0)
        t0 = time.perf_counter()
        ext.stats_and_grad(z, y, None, None, 0.0, 0.0, n_grad, None)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(rows: int, vocab: int, reps: int) -> list[dict]:
    """One row per (code path, thread count, mode): ms per chunk and ns per logit."""
    import torch

    from xtf_kernels._native_build import available_isas, load_native

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(rows, vocab, generator=g) * 3
    y = torch.randint(0, vocab, (rows,), generator=g)
    threads = sorted({1, torch.get_num_threads()})
    out = []
    for isa in available_isas():
        ext = load_native(isa=isa)
        for th in threads:
            torch.set_num_threads(th)
            for mode, n_grad in (("stats", 0), ("stats+grad", rows)):
                _time(ext, z0, y, n_grad, 1)  # warm-up
                s = _time(ext, z0, y, n_grad, reps)
                out.append({"isa": isa, "lanes": ext.build_info().split("lanes=")[1].split(",")[0],
                            "threads": th, "mode": mode, "rows": rows, "vocab": vocab,
                            "ms_per_chunk": round(s * 1e3, 3), "ns_per_logit": round(s / (rows * vocab) * 1e9, 4)})
        torch.set_num_threads(max(threads))
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['isa']}\n{r['threads']} thr" for r in rows if r["mode"] == "stats"]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 3.5))
    for k, mode in enumerate(("stats", "stats+grad")):
        vals = [r["ns_per_logit"] for r in rows if r["mode"] == mode]
        ax.bar([i + 0.4 * k for i in range(len(vals))], vals, width=0.4, label=mode)
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels)
    ax.set_ylabel("ns per logit (median)")
    ax.set_title(f"native row kernel, fp32 chunk {rows[0]['rows']} x {rows[0]['vocab']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=524, help="rows of the chunk (default 524: S1's)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary columns (default 32000)")
    ap.add_argument("--reps", type=int, default=7, help="timed repeats per case (median; default 7)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    args = ap.parse_args(argv)
    for name in ("rows", "vocab", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.masked_ce.report import device_name
    from xtf_kernels._native_build import load_native

    rows = measure(args.rows, args.vocab, args.reps)
    host = load_native().build_info().split(", ")[1]  # the host build's path: avx512f, avx2, ...
    dev = f"{device_name('cpu')}-{host}"

    print(f"{'isa':<10}{'lanes':>6}{'threads':>8}  {'mode':<11}{'ms/chunk':>10}{'ns/logit':>10}")
    for r in rows:
        print(f"{r['isa']:<10}{r['lanes']:>6}{r['threads']:>8}  {r['mode']:<11}{r['ms_per_chunk']:>10.2f}"
              f"{r['ns_per_logit']:>10.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"row-kernel-{dev}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", *rows[0]])
        w.writeheader()
        for r in rows:
            w.writerow({"device": dev, **r})
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
