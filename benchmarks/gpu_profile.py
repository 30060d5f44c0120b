"""Time the pieces of the Triton backend's GPU paths one by one (a tuning aid, GPU only).

``python -m benchmarks.gpu_profile [--N 8192 --D 4096 --V 128256]``: cuBLAS GEMMs (bf16
out, fp32 out), the fused statistics kernel for several vocabulary splits, the chunked
cuBLAS + row-kernel statistics, and the backend's forward / backward paths, each with
triton.testing.do_bench (median ms) and the peak memory above the inputs. Prints a table.
"""

from __future__ import annotations

import argparse

import torch


def bench(fn, reps: int = 20) -> tuple[float, float]:
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=3, rep=reps * 10, return_mode="median")
    return ms, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=6603)
    ap.add_argument("--D", type=int, default=4096)
    ap.add_argument("--V", type=int, default=128256)
    a = ap.parse_args()
    from benchmarks.masked_ce import Shape, make_inputs
    from xtf_kernels.backends._triton import kernels as k
    from xtf_kernels.backends.base import CEConfig
    from xtf_kernels.backends.triton_backend import TritonBackend

    sh = Shape("p", a.N, a.D, a.V, "bfloat16", ignore=0.0)
    h, w, y = make_inputs(sh, "cuda")
    N, D, V = a.N, a.D, a.V
    flop = 2 * N * D * V
    rows = []

    def add(name, fn, gemms=1.0):
        try:
            ms, peak = bench(fn)
            rows.append((name, ms, gemms * flop / ms / 1e9, peak))
        except Exception as exc:  # report and go on
            rows.append((name, float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:90]))

    out_bf = torch.empty(N, V, dtype=torch.bfloat16, device="cuda")
    add("mm bf16 [N,V]", lambda: torch.mm(h, w.t(), out=out_bf))
    out32 = torch.empty(N, 4096 if V > 4096 else V, dtype=torch.float32, device="cuda")
    wb = w[: out32.shape[1]]
    add("mm out_dtype=f32 [N,4096]", lambda: torch.mm(h, wb.t(), out_dtype=torch.float32, out=out32),
        out32.shape[1] / V)
    add("addmm out_dtype=f32 [N,4096]",
        lambda: torch.addmm(out32, h, wb.t(), out_dtype=torch.float32, out=out32), out32.shape[1] / V)
    add("mm f32 upcast [N,4096]", lambda: torch.mm(h.float(), wb.float().t(), out=out32), out32.shape[1] / V)
    st = torch.empty(4, N, dtype=torch.float32, device="cuda")
    for sp in (None, 1, 4, 8, 16, 32):
        add(f"fused_stats splits={sp}", lambda sp=sp: k.fused_stats(h, w, None, y, None, st, splits=sp))
    for ce in (1 << 22, 1 << 24, 1 << 26):
        r = max(1, ce * 2 // V)
        buf = torch.empty(r, V, dtype=torch.bfloat16, device="cuda")

        def chunked(r=r, buf=buf):
            for s in range(0, N, r):
                e = min(N, s + r)
                g = buf[: e - s]
                torch.mm(h[s:e], w.t(), out=g)
                k.rows_stats(g, None, y[s:e], softcap=None, stats_out=st[:, s:e])
        add(f"chunked stats rows={r}", chunked)
    tb = TritonBackend()
    for ce in (1 << 22, 1 << 24, 1 << 26):
        cfg = CEConfig(chunk_elems=ce)
        add(f"backend.forward n_grad=N ce=2^{ce.bit_length() - 1}",
            lambda cfg=cfg: tb.forward(h, w, None, y, cfg, N), 3.0)
        lse = st[0].clone()
        sc = torch.ones(N, device="cuda")
        add(f"backend.backward ce=2^{ce.bit_length() - 1}",
            lambda cfg=cfg, lse=lse, sc=sc: tb.backward(h, w, None, y, lse, sc, cfg), 3.0)
    print(f"N={N} D={D} V={V} bf16; TFLOP/s counts the GEMMs the path needs")
    print(f"{'piece':<40}{'ms':>9}{'TFLOP/s':>9}  peak MiB")
    for name, ms, tf, peak in rows:
        pk = f"{peak:.0f}" if isinstance(peak, float) else peak
        print(f"{name:<40}{ms:>9.3f}{tf:>9.0f}  {pk}")


if __name__ == "__main__":
    main()
