"""bf16 logits with a bias / softcap on the CPU: what an fp32 GEMM result would cost, and the
error of the fast path that rounds the GEMM output to bf16 before the epilogue.

``python -m benchmarks.half_epilogue_cpu [--rows 256] [--reps 5] [--out benchmarks/results]``

Part 1 (speed) times one logits chunk ``x [rows, D] @ W^T [D, V]`` as the native backend
forms it (D = 2048, V = 128256, bf16: the S2 shape) through every route to an fp32 result
that torch offers on this machine, against the bf16 GEMM the native backend uses:

* ``bf16-mm``: ``torch.mm`` in bf16 (oneDNN, fp32 accumulation, bf16 output): the fast path;
* ``fp32-upcast``: both operands upcast, fp32 ``torch.mm`` (exact products, fp32 output);
* ``mkl-bf16f32``: MKL's ``cblas_gemm_bf16bf16f32`` (bf16 inputs, fp32 output), exported by
  ``libtorch_cpu`` and called through ctypes (skipped when the symbol is absent);
* ``bf16-2gemm``: a compensated pair, ``hi = bf16(x W^T)`` then ``lo = bf16(x W^T - hi)``
  through ``addmm`` with beta = -1 (nearly fp32: ``hi + lo``), twice the GEMM work;
* ``mm-out_dtype``: ``torch.mm(..., out_dtype=torch.float32)``, reported if it raises.

Part 2 (error) runs ``masked_ce`` with a bias and softcap 30 on bf16 inputs (N = 512,
D = 2048, V = 32000, logits of standard deviation ~3 plus an N(0, 1) bias) on the CPU
backends (native and torch: bf16 GEMM output, then the fp32 epilogue), the fp32-logits
route the CUDA backends take (the GEMM result in fp32 through the epilogue, here by an
upcast GEMM), and same-dtype PyTorch (``F.linear`` in bf16, softcap in bf16, fp32 loss: what
eager code does). Per-row ``lse`` and ``logprob`` errors against float64: mean
and max over rows, and the native backend's error minus same-dtype PyTorch's, per row.

Prints both tables and writes ``<out>/cpu-half-epilogue.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _mkl_gemm():
    """MKL's cblas_gemm_bf16bf16f32 from libtorch_cpu, or None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]

    def mm(x, w, out):  # out [M, V] = x [M, K] @ w [V, K]^T; row-major, no-trans / trans
        M, K = x.shape
        fn(101, 111, 112, M, w.shape[0], K, 1.0, x.data_ptr(), K, w.data_ptr(), K, 0.0, out.data_ptr(),
           w.shape[0])
        return out
    return mm


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def speed(rows: int, reps: int, D: int = 2048, V: int = 128256) -> list[dict]:
    """Median seconds of each route to a ``[rows, V]`` logits chunk (bf16 inputs, width ``D``),
    and its max error against float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, D, generator=g).bfloat16()
    w = (torch.randn(V, D, generator=g) * D**-0.5).bfloat16()
    ref = x.double() @ w.double().t()
    wt = w.t()
    ob = torch.empty(rows, V, dtype=torch.bfloat16)
    of = torch.empty(rows, V)
    mkl = _mkl_gemm()

    def two_gemm():
        torch.mm(x, wt, out=ob)
        lo = torch.addmm(ob, x, wt, beta=-1.0)
        return of.copy_(ob).add_(lo)  # in fp32

    routes = {
        "bf16-mm": lambda: torch.mm(x, wt, out=ob),
        "fp32-upcast": lambda: torch.mm(x.float(), wt.float(), out=of),
        "mkl-bf16f32": (lambda: mkl(x, w, of)) if mkl else None,
        "bf16-2gemm": two_gemm,
        "mm-out_dtype": lambda: torch.mm(x, wt, out_dtype=torch.float32),
    }
    rows_out = []
    base = None
    for name, fn in routes.items():
        row = {"part": "speed", "route": name, "rows": rows, "D": D, "V": V}
        if fn is None:
            row["note"] = "symbol not exported by this torch build"
            rows_out.append(row)
            continue
        try:
            out = fn()
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            row["note"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            rows_out.append(row)
            continue
        row["max_abs_err"] = (out.double() - ref).abs().max().item()
        row["seconds"] = _median_time(fn, reps)
        if base is None:
            base = row["seconds"]
        row["vs_bf16_mm"] = row["seconds"] / base
        rows_out.append(row)
    return rows_out


def _errors(lse, lp, ref_lse, ref_lp):
    e_lse = (lse.double() - ref_lse).abs()
    e_lp = (lp.double() - ref_lp).abs()
    return e_lse, e_lp


@contextlib.contextmanager
def _cpu_half_gemm(mode: str):
    """XTF_CPU_HALF_GEMM set to ``mode`` for the block, restored after."""
    before = os.environ.get("XTF_CPU_HALF_GEMM")
    os.environ["XTF_CPU_HALF_GEMM"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("XTF_CPU_HALF_GEMM", None)
        else:
            os.environ["XTF_CPU_HALF_GEMM"] = before


def error(N: int = 512, D: int = 2048, V: int = 32000, cap: float = 30.0) -> list[dict]:
    """Per-row lse / logprob errors of each implementation against float64 (mean, max)."""
    from xtf_kernels import backend_status, masked_ce

    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, D, generator=g).bfloat16()
    w = (torch.randn(V, D, generator=g) * 3 * D**-0.5).bfloat16()
    b = torch.randn(V, generator=g).bfloat16()
    y = torch.randint(0, V, (N,), generator=g)

    def stats_of(z):
        lse = torch.logsumexp(z, 1)
        return lse, z.gather(1, y[:, None])[:, 0] - lse

    z64 = cap * torch.tanh((h.double() @ w.double().t() + b.double()) / cap)
    ref_lse, ref_lp = stats_of(z64)
    zs = F.linear(h, w, b)  # eager, same dtype: bf16 GEMM + bias, softcap in bf16, fp32 loss
    same_lse, same_lp = stats_of((cap * torch.tanh(zs / cap)).float())
    s_lse, s_lp = _errors(same_lse, same_lp, ref_lse, ref_lp)
    out = [{"part": "error", "route": "same-dtype PyTorch (eager)", "lse_mean": s_lse.mean().item(),
            "lse_max": s_lse.max().item(), "logprob_mean": s_lp.mean().item(), "logprob_max": s_lp.max().item()}]
    z32 = h.float() @ w.float().t() + b.float()
    f_lse, f_lp = _errors(*stats_of(cap * torch.tanh(z32 / cap)), ref_lse, ref_lp)
    out.append({"part": "error", "route": "fp32 logits (torch / Triton on CUDA)", "lse_mean": f_lse.mean().item(),
                "lse_max": f_lse.max().item(), "logprob_mean": f_lp.mean().item(),
                "logprob_max": f_lp.max().item(), "lse_excess_max": (f_lse - s_lse).max().item(),
                "logprob_excess_max": (f_lp - s_lp).max().item()})
    for be in ("native", "torch"):
        if not backend_status()[be][0]:
            continue
        for mode in ("fp32", "half"):  # the default, then the opt-in rounding GEMM
            with _cpu_half_gemm(mode), torch.no_grad():
                _, st = masked_ce(h, w, y, bias=b, softcap=cap, return_stats=True, backend=be)
            e_lse, e_lp = _errors(st.lse, st.logprob, ref_lse, ref_lp)
            route = f"xtf {be}" if mode == "fp32" else f"xtf {be}, XTF_CPU_HALF_GEMM=half"
            out.append({
                "part": "error", "route": route, "lse_mean": e_lse.mean().item(), "lse_max": e_lse.max().item(),
                "logprob_mean": e_lp.mean().item(), "logprob_max": e_lp.max().item(),
                "lse_excess_max": (e_lse - s_lse).max().item(), "logprob_excess_max": (e_lp - s_lp).max().item(),
            })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.half_epilogue_cpu",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="logits rows per GEMM (native: ~261 at S2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per route (median)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="suffix of the CSV name (e.g. the CPU's ISA: avx2)")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}",
          file=sys.stderr)
    rows = speed(args.rows, args.reps) + error()
    print(f"{'route':<28}{'seconds':>9}{'x bf16':>8}{'max err':>10}  note")
    for r in rows:
        if r["part"] == "speed":
            sec = f"{r['seconds']:.3f}" if "seconds" in r else "-"
            rel = f"{r['vs_bf16_mm']:.2f}" if "vs_bf16_mm" in r else "-"
            err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-"
            print(f"{r['route']:<28}{sec:>9}{rel:>8}{err:>10}  {r.get('note', '')}")
    print(f"\n{'per-row error vs float64':<38}{'lse mean':>10}{'lse max':>10}{'lp mean':>10}{'lp max':>10}"
          f"{'lse -same':>11}{'lp -same':>10}")
    for r in rows:
        if r["part"] == "error":
            ex = [r.get("lse_excess_max"), r.get("logprob_excess_max")]
            print(f"{r['route']:<38}{r['lse_mean']:>10.2e}{r['lse_max']:>10.2e}{r['logprob_mean']:>10.2e}"
                  f"{r['logprob_max']:>10.2e}" + "".join("" if v is None else f"{v:>11.2e}" for v in ex))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["part", "route", "rows", "D", "V", "seconds", "vs_bf16_mm", "max_abs_err", "lse_mean", "lse_max",
            "logprob_mean", "logprob_max", "lse_excess_max", "logprob_excess_max", "note", "loadavg_start",
            "threads", "torch"]
    path = out / (f"cpu-half-epilogue-{args.tag}.csv" if args.tag else "cpu-half-epilogue.csv")
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols)
        wr.writeheader()
        for r in rows:
            wr.writerow(dict(r, loadavg_start=f"{load:.2f}", threads=torch.get_num_threads(),
                             torch=torch.__version__))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
