"""Peak memory of the attention-received scorer vs eager attention probabilities.

For each sequence length L, one attention layer's received attention is computed two ways,
each in a fresh subprocess so the peak resident set size (RSS, CPU) or the peak CUDA
allocation (GPU) belongs to that case alone:

* ``xtf``: :func:`xtf_kernels.attention.attention_received` (query blocks, O(L) extra per head);
* ``eager``: what ``attn_implementation="eager"`` + ``output_attentions=True`` does, i.e. the
  full ``[B, H, L, L]`` scores and fp32 softmax probabilities, then their column sums.

Eager cases whose estimated footprint (scores + probabilities) exceeds ``--max-eager-gb``
are skipped and recorded as such. Writes ``benchmarks/results/attention_memory_<device>.csv``
and ``.png``.

Usage::

    python -m benchmarks.attention_memory                       # L = 1024 4096 16384, CPU
    python -m benchmarks.attention_memory --lengths 1024 4096 --max-eager-gb 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import time
from pathlib import Path

from benchmarks._child import ROOT, run_child

RESULTS = ROOT / "benchmarks" / "results"
FIELDS = [
    "device", "method", "L", "B", "Hq", "Hkv", "Dh", "dtype", "status",
    "baseline_mb", "peak_mb", "extra_mb", "seconds", "note",
]


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(args: argparse.Namespace) -> None:
    """Run one case and print a JSON line with its memory numbers."""
    import torch

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    B, Hq, Hkv, L, Dh = args.B, args.Hq, args.Hkv, args.L, args.Dh
    q = torch.randn(B, Hq, L, Dh, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, L, Dh, device=dev, dtype=dtype, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[:, : L // 8] = False  # some left padding
    v = torch.randn(B, Hkv, L, Dh, device=dev, dtype=dtype, generator=g) if args.method == "sdpa" else None
    run = lambda: _one(args.method, q, k, v, mask)  # noqa: E731
    if dev.type == "cuda":
        run()  # warm-up: kernel compilation and autotuning stay out of the time
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        r = run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    secs = sorted(times)[len(times) // 2]
    if args.method != "sdpa":
        assert r.shape == (B, Hq, L) and bool(torch.isfinite(r).all())
    print(json.dumps({"baseline_mb": base, "peak_mb": peak, "extra_mb": peak - base, "seconds": secs}))


def _one(method: str, q, k, v, mask):
    """One case's computation: ``xtf`` / ``eager`` received attention [B, Hq, L], or ``sdpa``
    (a plain causal SDPA forward with values, the cost of the model's own attention)."""
    import torch
    import torch.nn.functional as F

    from xtf_kernels.attention import attention_received

    B, Hq, L, Dh = q.shape
    Hkv = k.shape[1]
    with torch.no_grad():
        if method == "xtf":
            return attention_received(q, k, attention_mask=mask)
        if method == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)
        # eager attention: repeat_kv, full scores, additive mask, fp32 softmax, column sums
        kk = k.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.matmul(q, kk.transpose(2, 3)) * Dh**-0.5
        i = torch.arange(L, device=q.device)
        ok = (i[None, :] <= i[:, None])[None] & mask[:, None, :] & mask[:, :, None]
        s = s.masked_fill(~ok[:, None], torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1, dtype=torch.float32)
        del s
        p = p * ok[:, None]
        return p.sum(dim=2) / ok.sum(dim=1).clamp_min(1)[:, None]


def _eager_estimate_gb(B: int, Hq: int, L: int, itemsize: int) -> float:
    """Scores (input dtype) + fp32 probabilities + bool mask of eager attention, in GiB."""
    return (B * Hq * L * L * (itemsize + 4) + B * L * L) / 2**30


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--Hq", type=int, default=8)
    ap.add_argument("--Hkv", type=int, default=2)
    ap.add_argument("--Dh", type=int, default=64)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-eager-gb", type=float, default=6.0, help="skip eager cases estimated above this")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per case")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="output file stem suffix (default: the device)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=["xtf", "eager", "sdpa"], help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1, help="timed repeats per case (median; GPU: after a warm-up)")
    ap.add_argument("--sdpa", action="store_true", help="also time a plain causal SDPA forward per L")
    ap.add_argument("--L", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.child:
        _child(args)
        return
    if any(n < 1 for n in args.lengths):
        raise ValueError(f"--lengths: expected positive ints, got {args.lengths}")
    if args.Hq % args.Hkv:
        raise ValueError(f"--Hkv: expected a divisor of --Hq={args.Hq}, got {args.Hkv}")
    from tqdm import tqdm

    itemsize = 2 if args.dtype in ("bfloat16", "float16") else 4
    rows = []
    methods = ("xtf", "eager") + (("sdpa",) if args.sdpa else ())
    cases = [(L, m) for L in args.lengths for m in methods]
    for L, method in tqdm(cases, desc="attention memory", unit="case"):
        row = dict(device=args.device, method=method, L=L, B=args.B, Hq=args.Hq, Hkv=args.Hkv, Dh=args.Dh,
                   dtype=args.dtype, status="ok", baseline_mb="", peak_mb="", extra_mb="", seconds="", note="")
        est = _eager_estimate_gb(args.B, args.Hq, L, itemsize)
        if method == "eager" and est > args.max_eager_gb:
            row.update(status="skipped", note=f"needs ~{est:.1f} GiB for [B,H,L,L] scores+probs (> {args.max_eager_gb} GiB)")
            rows.append(row)
            continue
        cmd = [sys.executable, "-m", "benchmarks.attention_memory", "--child", "--method", method, "--L", str(L),
               "--B", str(args.B), "--Hq", str(args.Hq), "--Hkv", str(args.Hkv), "--Dh", str(args.Dh),
               "--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads),
               "--reps", str(args.reps)]
        out, failure = run_child(cmd, args.timeout)
        if failure:
            row.update(failure)
        else:
            row.update({key: round(val, 2) if key != "seconds" else round(val, 6) for key, val in out.items()})
            if method == "eager":
                row["note"] = f"estimated [B,H,L,L] footprint {est:.2f} GiB"
        rows.append(row)
        tqdm.write(f"{method:5s} L={L:6d}: {row['status']} extra={row['extra_mb']} MiB {row['note']}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"attention_memory_{args.tag or args.device}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    _plot(rows, stem.with_suffix(".png"), args)
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.png')}")


def _plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, label, style in (("xtf", "attention_received (query blocks)", "o-"),
                                 ("eager", "eager probabilities [B,H,L,L]", "s--")):
        pts = [(r["L"], r["extra_mb"]) for r in rows if r["method"] == method and r["status"] == "ok"]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for r in rows:
            if r["method"] == method and r["status"] == "skipped":
                ax.annotate(f"eager skipped at L={r['L']}\n({r['note'].split(' for')[0]})",
                            xy=(r["L"], 0.5), xycoords=("data", "axes fraction"), ha="right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("extra peak memory (MiB)")
    ax.set_title(f"received attention, one layer: B={args.B} Hq={args.Hq} Hkv={args.Hkv} Dh={args.Dh} "
                 f"{args.dtype} ({args.device})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
