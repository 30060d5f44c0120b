"""Native CPU backend (``backend="native"``): ATen GEMMs around the C++ row kernels in ``csrc/``.

Division of labour: every GEMM is ``torch.mm`` (oneDNN / MKL; bf16 stays bf16 inside the
GEMM, accumulating in fp32), everything between the GEMMs is one call into the compiled
extension (:mod:`xtf_kernels._native_build`): a single threaded, vectorised pass over each
row of a logits chunk for the statistics and, in place, the gradient.

Memory plan of the gradient-in-forward path (``Options.grad_in_forward=True``), for ``M``
gradient rows, vocabulary ``V``, width ``D``:

* fp32 inputs: row chunks of ``chunk_elems`` logits; ``dW`` (fp32, the output itself) is
  accumulated by ``addmm_`` chunk after chunk. Extra memory: one chunk + dW.
* bf16 / fp16 inputs: the gradient logits of all ``M`` rows are kept (``M x V`` in the input
  dtype) whenever that costs no more than the fp32 ``[V, D]`` accumulator it replaces
  (``2 M <= 4 D``, e.g. S2: 420 MB instead of 1.05 GB); ``dW`` is then ONE GEMM over all
  rows, accumulated in fp32 inside the GEMM and rounded once. Otherwise rows are grouped
  by ``chunk_elems`` and the groups' ``dW`` are summed in an fp32 accumulator.

The bias gradient is summed in fp32 inside the row kernel, before the gradient logits are
rounded to the input dtype.

The recompute path (:meth:`NativeBackend.backward`) walks vocabulary blocks with one GEMM
over all rows per block (every dW block accumulated in fp32 inside the GEMM): four GEMMs,
no ``[V, D]`` fp32 buffer. float64 (gradcheck) is delegated to the torch backend.
"""

from __future__ import annotations

import torch

from ._gemm import add_mm
from ._plan import rows_per_chunk, spans, vocab_blocks
from .base import (
    BackendBase,
    CEConfig,
    ForwardOut,
    GradOut,
    RowSelect,
    RowStats,
    cpu_fp32_call,
    select_rows,
)

_LOW = (torch.bfloat16, torch.float16)


def _ext():
    from .._native_build import load_native

    return load_native()


def _keep_all(dt: torch.dtype, M: int, V: int, D: int, cfg: CEConfig) -> bool:
    """The half-precision plan that keeps all ``M`` rows' gradient logits (``M x V`` in ``dt``)
    when they cost no more than the chunk budget or the fp32 ``[V, D]`` accumulator they
    replace (module doc): dW is then one GEMM over all rows."""
    return dt in _LOW and M * V * dt.itemsize <= max(cfg.chunk_elems * 4, V * D * 4)


def _row_stats(ext, z: torch.Tensor, y: torch.Tensor, bf: torch.Tensor | None, cfg: CEConfig,
               n_grad: int, db: torch.Tensor | None = None) -> RowStats:
    """The C++ row kernel on the logits ``z`` ``[r, V]``: its five fp32 ``[r]`` statistics,
    named (the extension returns them in :class:`RowStats` order); the first ``n_grad`` rows of
    ``z`` are overwritten with their gradient (``db`` accumulated)."""
    return RowStats(*ext.stats_and_grad(z, y, bf, cfg.softcap, cfg.label_smoothing, cfg.z_loss, n_grad, db))


class NativeBackend(BackendBase):
    """C++/OpenMP CPU backend (see :mod:`xtf_kernels.backends.base` for the contract)."""

    name = "native"

    def available(self) -> tuple[bool, str]:
        """(True, build info) once the extension is compiled / loaded, else (False, why)."""
        from .._native_build import native_status

        ok, why = native_status()
        return (True, "") if ok else (False, why)

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        """CPU tensors of float32 / bfloat16 / float16 (float64 is delegated to the torch path)."""
        if torch.device(device).type != "cpu":
            return False, "the native backend runs on the CPU only"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            return False, f"unsupported dtype {dtype}"
        return True, ""

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _torch():
        from .torch_backend import TorchBackend

        return TorchBackend()

    def _stats_rows(self, x, w, bf, y, cfg, out: RowStats, start: int) -> None:
        """Statistics of rows ``start:`` of x (no gradient) into ``out``."""
        M = x.shape[0]
        V = w.shape[0]
        if start >= M:
            return
        ext = _ext()
        rows = rows_per_chunk(M - start, V, cfg, x.dtype)
        buf = torch.empty(rows, V, dtype=x.dtype)
        wt = w.t()
        for s, e in spans(M - start, rows):
            s, e = s + start, e + start
            z = buf[: e - s]
            torch.mm(x[s:e], wt, out=z)
            out.put(s, e, _row_stats(ext, z, y[s:e], bf, cfg, 0))

    # ------------------------------------------------------------------ forward
    @cpu_fp32_call
    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        y: torch.Tensor,
        cfg: CEConfig,
        n_grad: int,
    ) -> ForwardOut:
        """Statistics of every row; gradient of the first ``n_grad`` rows (see the module doc).

        Shapes: x [M, D], w [V, D], b [V] | None (all one float dtype), y [M] int64 in [0, V).
        Returns fp32 [M] statistics (row_max and the rest relative to it, as in
        :class:`ForwardOut`), dx [n_grad, D] (x.dtype), dw [V, D] (fp32 for fp32
        inputs, else x.dtype rounded once from fp32 sums), db [V] fp32.
        """
        if x.dtype == torch.float64:
            return self._torch().forward(x, w, b, y, cfg, n_grad)
        M = x.shape[0]
        x = x.contiguous()
        y = y.contiguous()
        bf = b.float().contiguous() if b is not None else None
        out = RowStats.empty(M)
        dx = dw = db = None
        if n_grad:
            dx, dw, db = self._grad_rows(x[:n_grad], w, bf, y[:n_grad], cfg, out)
        self._stats_rows(x, w, bf, y, cfg, out, n_grad)
        return ForwardOut.of(out, dx, dw, db)

    def _grad_rows(self, x, w, bf, y, cfg, out):
        """Statistics and gradient (unit upstream) of all rows of x into ``out``; returns (dx, dw, db)."""
        ext = _ext()
        M, D = x.shape
        V = w.shape[0]
        dt = x.dtype
        wt = w.t()
        db = torch.zeros(V, dtype=torch.float32) if bf is not None else None
        dx = torch.empty(M, D, dtype=dt)
        if _keep_all(dt, M, V, D, cfg):
            # keep every row's gradient logits: dW is one GEMM over all rows (fp32 inside)
            z = torch.mm(x, wt)
            out.put(0, M, _row_stats(ext, z, y, bf, cfg, M, db))
            torch.mm(z, w, out=dx)
            dw = torch.mm(z.t(), x)
            return dx, dw, db
        rows = rows_per_chunk(M, V, cfg, dt)
        buf = torch.empty(rows, V, dtype=dt)
        dw = torch.zeros(V, D, dtype=torch.float32)
        for s, e in spans(M, rows):
            z = buf[: e - s]
            torch.mm(x[s:e], wt, out=z)
            out.put(s, e, _row_stats(ext, z, y[s:e], bf, cfg, e - s, db))
            torch.mm(z, w, out=dx[s:e])
            add_mm(dw, z.t(), x[s:e])
        del buf
        if dt != torch.float32:
            dw = dw.to(dt)  # every partial sum was fp32: one rounding
        return dx, dw, db

    @cpu_fp32_call
    def forward_rowwise(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        y: torch.Tensor,
        cfg: CEConfig,
        row_select: RowSelect,
    ) -> tuple[ForwardOut, torch.Tensor]:
        """Forward whose gradient rows are chosen chunk by chunk by ``row_select``.

        ``row_select(start, end, row_max, lse, gold, entropy) -> bool [end - start]`` sees each chunk's
        fp32 statistics while its logits are in memory; selected rows get their gradient from
        the same logits (one logits GEMM in total). Returns (ForwardOut with dx of the selected
        rows in row order, bool [M] selection).
        """
        if x.dtype == torch.float64:
            return self._torch().forward_rowwise(x, w, b, y, cfg, row_select)
        ext = _ext()
        M, D = x.shape
        V = w.shape[0]
        dt = x.dtype
        x = x.contiguous()
        y = y.contiguous()
        bf = b.float().contiguous() if b is not None else None
        sel = torch.zeros(M, dtype=torch.bool)
        wt = w.t()
        rows = rows_per_chunk(M, V, cfg, dt)
        db = torch.zeros(V, dtype=torch.float32) if bf is not None else None
        if _keep_all(dt, M, V, D, cfg):
            # keep-all plan (as in forward): ONE logits GEMM for every row, the rule applied
            # chunk by chunk on the statistics, the selected rows compacted in place to the
            # front of the logits buffer, then one dX GEMM and one dW GEMM over them
            z = torch.mm(x, wt)
            out = _row_stats(ext, z, y, bf, cfg, 0)
            for s, e in spans(M, rows):
                sel[s:e] = select_rows(row_select, s, e, out.rows(s, e))
            g = sel.nonzero().squeeze(1)
            k = g.numel()
            for i, r in enumerate(g.tolist()):  # r >= i: forward copies never clobber unread rows
                if r != i:
                    z[i].copy_(z[r])
            zg = z[:k]
            if k:
                ext.grad_block_(zg, y.index_select(0, g), out.row_max.index_select(0, g),
                                out.lse.index_select(0, g), None, bf, 0, V, cfg.softcap,
                                cfg.label_smoothing, cfg.z_loss, db)
            dx = torch.mm(zg, w)
            dw = torch.mm(zg.t(), x.index_select(0, g)) if k else torch.zeros(V, D, dtype=dt)
            return ForwardOut.of(out, dx, dw, db), sel
        # row chunks: gradient of each chunk's selected rows, dW summed in fp32
        out = RowStats.empty(M)
        buf = torch.empty(rows, V, dtype=dt)
        dw = torch.zeros(V, D, dtype=torch.float32)
        dx_parts: list[torch.Tensor] = []
        for s, e in spans(M, rows):
            z = buf[: e - s]
            torch.mm(x[s:e], wt, out=z)
            st = _row_stats(ext, z, y[s:e], bf, cfg, 0)
            out.put(s, e, st)
            m = select_rows(row_select, s, e, st)
            sel[s:e] = m
            g = m.nonzero().squeeze(1)
            if not g.numel():
                continue
            zg = z.index_select(0, g)
            ext.grad_block_(zg, y[s:e].index_select(0, g), st.row_max.index_select(0, g),
                            st.lse.index_select(0, g), None, bf, 0, V, cfg.softcap,
                            cfg.label_smoothing, cfg.z_loss, db)
            dx_parts.append(torch.mm(zg, w))
            add_mm(dw, zg.t(), x[s:e].index_select(0, g))
        del buf
        if dt != torch.float32:
            dw = dw.to(dt)  # every partial sum was fp32: one rounding
        dx = torch.cat(dx_parts) if dx_parts else x.new_empty(0, D)
        return ForwardOut.of(out, dx, dw, db), sel

    # ------------------------------------------------------------------ backward
    @cpu_fp32_call
    def backward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        y: torch.Tensor,
        row_max: torch.Tensor,
        lse: torch.Tensor,
        row_scale: torch.Tensor,
        cfg: CEConfig,
        *,
        vocab_start: int = 0,
        vocab: int | None = None,
    ) -> GradOut:
        """Gradients of ``sum_i row_scale[i] * loss_i`` by vocabulary-blocked recompute.

        Shapes: x [M, D], w [V, D], b [V] | None, y [M] int64, row_max / lse (relative to
        row_max, as the forward returns them) / row_scale [M] fp32.
        On a vocabulary shard, ``w`` / ``b`` hold ids ``[vocab_start, vocab_start + V)`` of
        ``vocab`` (see :mod:`.base`).
        Returns dx [M, D] (x.dtype), dw [V, D] (w.dtype; each block one GEMM over all rows,
        fp32 inside), db [V] fp32 | None.
        """
        if x.dtype == torch.float64:
            return self._torch().backward(x, w, b, y, row_max, lse, row_scale, cfg,
                                          vocab_start=vocab_start, vocab=vocab)
        ext = _ext()
        M, D = x.shape
        V = w.shape[0]
        n_vocab = V if vocab is None else vocab
        dt = x.dtype
        x = x.contiguous()
        # the row kernel's gold column is y - v0 with v0 the block's offset inside the shard
        y = (y - vocab_start if vocab_start else y).contiguous()
        row_max = row_max.float().contiguous()
        lse = lse.float().contiguous()
        row_scale = row_scale.float().contiguous()
        bf = b.float().contiguous() if b is not None else None
        dw = torch.empty(V, D, dtype=dt)
        db = torch.zeros(V, dtype=torch.float32) if b is not None else None
        dx = torch.zeros(M, D, dtype=torch.float32)
        if M == 0:
            dw.zero_()
            return GradOut(dx.to(dt), dw, db)
        rc, vb = vocab_blocks(M, V, cfg, dt)
        buf = torch.empty(rc * vb, dtype=dt)
        for v0, v1 in spans(V, vb):
            wb = w[v0:v1]
            dw_blk = torch.zeros(v1 - v0, D, dtype=torch.float32) if rc < M else None
            for s, e in spans(M, rc):
                z = buf[: (e - s) * (v1 - v0)].view(e - s, v1 - v0)
                torch.mm(x[s:e], wb.t(), out=z)
                ext.grad_block_(z, y[s:e], row_max[s:e], lse[s:e], row_scale[s:e], bf, v0, n_vocab, cfg.softcap,
                                cfg.label_smoothing, cfg.z_loss, None if db is None else db[v0:v1])
                add_mm(dx[s:e], z, wb)
                if dw_blk is None:
                    torch.mm(z.t(), x[s:e], out=dw[v0:v1])
                else:
                    add_mm(dw_blk, z.t(), x[s:e])
            if dw_blk is not None:
                dw[v0:v1] = dw_blk
        return GradOut(dx.to(dt), dw, db)
