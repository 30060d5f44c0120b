"""Vocabulary-parallel masked_ce on the CPU: the LM head split over 2 processes (1 thread each,
gloo) against one process with 2 threads on the whole head.

One training step of the loss alone (forward + backward of ``masked_ce``, mean over every
token) at S2 (N=2048, D=2048, V=128256, bf16; ``--small`` for N=1024, D=1024, V=32000).
Cases, each in fresh processes so the peaks are their own:

* ``single``: one process, 2 threads, the whole ``[V, D]`` head (default options: the
  gradient is formed in the forward, three GEMMs);
* ``single_recompute``: the same under ``grad_in_forward=False`` (four GEMMs: the plan the
  vocabulary-parallel path runs on each shard);
* ``vocab_parallel``: 2 processes x 1 thread, each with ``V / 2`` rows (``VocabParallel``),
  two all-reduces of per-row statistics in the forward and one of ``dX`` in the backward.

Per process: the median step time (forward, backward) over ``--repeats`` steps after one
warm-up, the peak RSS (``ru_maxrss``) and the step's own peak above the RSS before it
(sampled every 2 ms). The CSV and a plot go to ``benchmarks/results/``, named after the device.

    python benchmarks/vocab_parallel.py            # S2
    python benchmarks/vocab_parallel.py --small
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("single", "single_recompute", "vocab_parallel")
WORLD = 2
FIELDS = (
    "device",
    "torch",
    "case",
    "rank",
    "processes",
    "threads",
    "N",
    "D",
    "V",
    "dtype",
    "rows",
    "fwd_s",
    "bwd_s",
    "total_s",
    "peak_rss_mb",
    "step_peak_mb",
    "loss",
    "status",
    "note",
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """The largest RSS seen while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> _Peak:
        self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _head_rows(start: int, stop: int, D: int, dtype):
    """Rows ``[start, stop)`` of one fixed ``[V, D]`` head, built block by block (seeded per
    block of 4096 rows), so a shard never materialises the whole head and the shards of the
    parallel run are the rows of the single-process head (the losses agree)."""
    import torch

    blk = 4096
    parts = []
    for b0 in range(start // blk * blk, stop, blk):
        g = torch.Generator().manual_seed(1 + b0 // blk)
        rows = torch.randn(blk, D, generator=g) * D**-0.5
        parts.append(rows[max(start - b0, 0) : min(stop - b0, blk)].to(dtype))
    return torch.cat(parts)


def _child(args: argparse.Namespace) -> dict:
    """One process of one case: build its inputs, time the steps, report as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    import xtf_kernels
    from xtf_kernels import VocabParallel, masked_ce

    dist = None
    vp = None
    start, rows = 0, args.V
    if args.case == "vocab_parallel":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=WORLD
        )
        per = -(-args.V // WORLD)
        start, stop = args.rank * per, min(args.V, (args.rank + 1) * per)
        vp, rows = VocabParallel(start, stop), stop - start
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)  # the same hidden states and labels on every rank
    hidden = (torch.randn(args.N, args.D, generator=g) * 0.5).to(dt)
    labels = torch.randint(0, args.V, (args.N,), generator=g)
    weight = _head_rows(start, start + rows, args.D, dt)
    opts = dict(grad_in_forward=args.case == "single")
    fwd, bwd, peaks, loss_value = [], [], [], float("nan")
    for i in range(args.repeats + 1):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if dist is not None:
            dist.barrier()
        base = _rss()
        with _Peak() as pk, xtf_kernels.options(**opts):
            t0 = time.perf_counter()
            loss = masked_ce(h, w, labels, vocab_parallel=vp)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        if i:  # the first step warms up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            peaks.append(pk.peak - base)
        loss_value = float(loss)
        del h, w, loss
    if dist is not None:
        dist.destroy_process_group()
    fs, bs = statistics.median(fwd), statistics.median(bwd)
    return dict(
        rows=rows,
        fwd_s=round(fs, 4),
        bwd_s=round(bs, 4),
        total_s=round(fs + bs, 4),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        step_peak_mb=round(max(peaks) / 2**20, 1),
        loss=round(loss_value, 5),
    )


def _launch(case: str, args: argparse.Namespace, tmp: str) -> list[dict]:
    """Run the processes of one case; one result row per process."""
    procs = WORLD if case == "vocab_parallel" else 1
    threads = 1 if case == "vocab_parallel" else WORLD
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    common = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--case",
        case,
        "--threads",
        str(threads),
        "--N",
        str(args.N),
        "--D",
        str(args.D),
        "--V",
        str(args.V),
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--init",
        str(Path(tmp) / f"init-{case}"),
    ]
    running = [
        subprocess.Popen(
            [*common, "--rank", str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for r in range(procs)
    ]
    rows = []
    for r, p in enumerate(running):
        try:
            out, err = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = "", f"over {args.timeout} s"
        base = dict(case=case, rank=r, processes=procs, threads=threads)
        try:
            rows.append({**base, **json.loads(out.strip().splitlines()[-1]), "status": "ok"})
        except (IndexError, json.JSONDecodeError):
            note = (err.strip().splitlines() or ["no output"])[-1][:200]
            rows.append({**base, "status": "failed", "note": note})
    return rows


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['case']}\nrank {r['rank']} ({r['threads']} thr)" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(labels, [r["fwd_s"] for r in ok], label="forward")
    axes[0].bar(labels, [r["bwd_s"] for r in ok], bottom=[r["fwd_s"] for r in ok], label="backward")
    axes[0].set_ylabel("seconds per step (median)")
    axes[0].legend()
    axes[1].bar(labels, [r["peak_rss_mb"] for r in ok], label="peak RSS")
    axes[1].bar(labels, [r["step_peak_mb"] for r in ok], label="step peak above its start")
    axes[1].set_ylabel("MB per process")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="N=1024, D=1024, V=32000 instead of S2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--cases", default=",".join(CASES))
    # the child's own arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--N", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--D", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--V", type=int, default=128256, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    if args.small:
        args.N, args.D, args.V = 1024, 1024, 32000
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {bad}; expected some of {CASES}")
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.masked_ce.report import device_name

    dev = device_name("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for r in _launch(case, args, tmp):
                r.update(
                    device=dev,
                    torch=torch.__version__,
                    N=args.N,
                    D=args.D,
                    V=args.V,
                    dtype=args.dtype,
                )
                rows.append(r)
                print(
                    {
                        k: r.get(k)
                        for k in (
                            "case",
                            "rank",
                            "total_s",
                            "fwd_s",
                            "bwd_s",
                            "peak_rss_mb",
                            "step_peak_mb",
                            "status",
                            "note",
                        )
                    },
                    flush=True,
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vocab_parallel_{dev}{'_small' if args.small else ''}"
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    _plot(
        rows,
        out / f"{stem}.png",
        f"masked_ce fwd+bwd, N={args.N} D={args.D} V={args.V} {args.dtype}",
    )
    print(f"wrote {out / stem}.csv and .png")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
