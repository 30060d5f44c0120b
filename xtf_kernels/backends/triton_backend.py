"""Triton backend of masked CE: fused statistics kernel + Liger-style gradient in the forward.

Importing this module never needs Triton: the kernels (:mod:`._triton.kernels`) are imported
on first use, and :meth:`TritonBackend.available` says why they cannot run where they cannot.

Paths (the design is in ``docs/triton.md``):

* statistics only (``n_grad == 0``, the scoring / select pass, and the masked rows after the
  kept ones): one fused kernel, logits never leave registers;
* gradient rows: row chunks (``_plan.rows_per_chunk``); logits by ``torch.mm`` into a
  reused ``[chunk, V]`` buffer, one Triton row kernel computes the statistics and overwrites
  the buffer with ``d(loss)/d(raw logits)``, then ``dx = G @ W`` and ``dW += G^T @ X`` (fp32);
  half-precision inputs with a bias or softcap get an fp32 logits buffer (cuBLAS'
  fp32-output GEMM) and a separate half buffer for the gradient, so the epilogue never sees
  rounded logits;
* :meth:`TritonBackend.backward`: the same chunks, with the given ``lse`` (one sweep).
"""

from __future__ import annotations

from types import ModuleType

import torch

from .._env import triton_interpret
from ._gemm import f32_epilogue
from ._gemm import mm_f32 as _mm_f32
from ._plan import rows_per_chunk as _rows_per_chunk
from ._plan import spans, vocab_blocks
from .base import BackendBase, CEConfig, ForwardOut, GradOut, RowSelect, RowStats, select_rows

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_kernels: ModuleType | None = None


def _load_kernels() -> ModuleType:
    """The kernel module (imports triton on first call)."""
    global _kernels
    if _kernels is None:
        from ._triton import kernels

        _kernels = kernels
    return _kernels


def _logits_dtype(x: torch.Tensor, b: torch.Tensor | None, cfg: CEConfig) -> torch.dtype:
    """dtype of the logits buffer: fp32 for half-precision inputs with a bias or softcap (the
    epilogue then never sees rounded logits), else ``x.dtype``."""
    return torch.float32 if f32_epilogue(x.dtype, b is not None, cfg.softcap) else x.dtype


def _logits_buffers(rows: int, cols: int, x: torch.Tensor, b, cfg: CEConfig, grad: bool = True):
    """(logits buffer, gradient buffer or None), each ``[rows, cols]``.

    With an fp32 logits buffer (:func:`_logits_dtype`) and ``grad``, the gradient goes to a
    separate ``x.dtype`` buffer (the gradient GEMMs' operand); otherwise the logits buffer is
    overwritten in place with the gradient.
    """
    dt = _logits_dtype(x, b, cfg)
    buf = torch.empty(rows, cols, dtype=dt, device=x.device)
    gbuf = torch.empty(rows, cols, dtype=x.dtype, device=x.device) if (grad and dt != x.dtype) else None
    return buf, gbuf


def _logits_mm(out: torch.Tensor, x: torch.Tensor, wt: torch.Tensor) -> None:
    """``out = x @ wt`` in ``out``'s dtype (fp32 straight from the accumulator when it is fp32)."""
    if out.dtype == x.dtype:
        torch.mm(x, wt, out=out)
    else:
        _mm_f32(out, x, wt, accumulate=False)


#: how the statistics of rows without a gradient are computed on CUDA: "cublas" (row chunks of
#: logits by torch.mm, then the row kernel) or "fused" (the Triton GEMM kernel, no logits in
#: memory). The interpreter always uses "fused". A tuning knob, not API.
STATS_MODE = "cublas"


def _stats_buffer(M: int, device: torch.device) -> tuple[torch.Tensor, RowStats]:
    """The kernels' packed fp32 ``[5, M]`` statistics buffer (rows in :class:`RowStats` field
    order, the layout ``_triton.kernels`` writes) and its named views."""
    buf = torch.empty(len(RowStats._fields), M, dtype=torch.float32, device=device)
    return buf, RowStats(*buf.unbind(0))


class TritonBackend(BackendBase):
    """Masked-CE backend on Triton kernels (see :mod:`xtf_kernels.backends.base`)."""

    name = "triton"

    def available(self) -> tuple[bool, str]:
        """(usable here?, reason when not): needs triton and a CUDA device or the interpreter."""
        try:
            k = _load_kernels()
        except Exception as exc:  # ImportError, or a broken triton install
            return False, f"triton cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
        if k.INTERPRETED:
            return True, ""
        if torch.cuda.is_available():
            return True, ""
        if triton_interpret():
            return False, ("TRITON_INTERPRET=1 was set after the Triton kernels were created; set it "
                           "before importing xtf_kernels' triton backend")
        return False, ("no CUDA device; set TRITON_INTERPRET=1 before importing triton to run the "
                       "kernels in Triton's CPU interpreter (slow; for tests)")

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        """Whether tensors of ``device`` / ``dtype`` can run: CUDA fp32/fp16/bf16; CPU fp32/fp16
        only under the interpreter."""
        device = torch.device(device)
        if dtype not in _DTYPES:
            return False, f"dtype: expected one of {_DTYPES}, got {dtype}"
        ok, why = self.available()
        if not ok:
            return False, why
        interp = _load_kernels().INTERPRETED
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and interp:
            if dtype == torch.bfloat16:
                return False, ("bfloat16 on the CPU interpreter: its tl.dot multiplies the raw bf16 "
                               "bits (triton issue 11584); use fp32/fp16 or a CUDA device")
            return True, ""
        return False, (f"device: Triton runs CUDA tensors (CPU tensors only under "
                       f"TRITON_INTERPRET=1), got {device}")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        y: torch.Tensor,
        cfg: CEConfig,
        n_grad: int,
    ) -> ForwardOut:
        """Statistics of every row; gradient of ``sum_i loss_i`` over rows ``[0, n_grad)``.

        Args:
            x: ``[M, D]`` fp32/fp16/bf16 compacted hidden rows.
            w: ``[V, D]`` LM head, same dtype. b: ``[V]`` or None.
            y: ``[M]`` int64 gold ids in ``[0, V)``.
            cfg: softcap / smoothing / z-loss / chunk size.
            n_grad: number of leading rows that need a gradient (0: statistics only).

        Returns:
            :class:`ForwardOut`: fp32 ``[M]`` statistics; ``dx`` ``[n_grad, D]`` x.dtype, ``dw``
            ``[V, D]`` fp32 or w.dtype (one fp32-accumulated GEMM per vocabulary block), ``db`` ``[V]`` fp32 (or None) when ``n_grad > 0``.
        """
        M = x.shape[0]
        x, w, b, y = self._prep(x, w, b, y)
        stats, st = _stats_buffer(M, x.device)
        dx = dw = db = None
        V = w.shape[0]
        if n_grad and n_grad <= _rows_per_chunk(n_grad, V, cfg, _logits_dtype(x, b, cfg)):
            # one row chunk holds every gradient row: Liger-style, 3 GEMMs, dW written once
            dx, dw, db, _ = self._grad_sweep(x, w, b, y, cfg, stats, n_grad)
            if M > n_grad:
                self._stats(x[n_grad:], w, b, y[n_grad:], cfg, stats[:, n_grad:])
        else:
            # statistics of every row from the fused kernel (no logits in memory), then the
            # gradient by vocabulary blocks: no fp32 [V, D] read-modify-write per row chunk
            self._stats(x, w, b, y, cfg, stats)
            if n_grad:
                dx, dw, db = self._vocab_blocked_grad(
                    x[:n_grad], w, b, y[:n_grad], st.row_max[:n_grad], st.lse[:n_grad], None, cfg, w.dtype
                )
        return ForwardOut.of(st, dx, dw, db)

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
        fp32 statistics while its logits are in the buffer; the selected rows then get their
        gradient from the same logits (one logits GEMM in total). Returns the
        :class:`ForwardOut` (``dx`` ``[n_selected, D]`` in row order) and the bool ``[M]``
        selection.
        """
        x, w, b, y = self._prep(x, w, b, y)
        M = x.shape[0]
        stats, st = _stats_buffer(M, x.device)
        if M <= _rows_per_chunk(M, w.shape[0], cfg, _logits_dtype(x, b, cfg)):
            # one logits GEMM per row chunk serves the statistics, the selection and the gradient
            dx, dw, db, sel = self._grad_sweep(x, w, b, y, cfg, stats, M, row_select)
        else:
            # many chunks (GPU): statistics and selection chunk by chunk, then the selected rows'
            # gradient by vocabulary blocks (dW formed once in w.dtype; no fp32 [V, D] updated
            # once per chunk, which costs more memory traffic than the extra logits GEMM)
            sel = self._stats(x, w, b, y, cfg, stats, row_select=row_select)
            idx = sel.nonzero().squeeze(1)
            dx, dw, db = self._vocab_blocked_grad(
                x.index_select(0, idx), w, b, y.index_select(0, idx), st.row_max.index_select(0, idx),
                st.lse.index_select(0, idx), None, cfg, w.dtype,
            )
        return ForwardOut.of(st, dx, dw, db), sel

    # ----------------------------------------------------------------- backward
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
        """Gradient of ``sum_i row_scale[i] * loss_i`` by recomputing the logits of the rows.

        Args:
            x, w, b, y, cfg: as in :meth:`forward`.
            row_max, lse: ``[M]`` fp32 row maximum and log-sum-exp relative to it (from the
                forward).
            row_scale: ``[M]`` fp32 upstream factor per row.
            vocab_start, vocab: ``w`` / ``b`` hold ids ``[vocab_start, vocab_start + V)`` of a
                vocabulary of ``vocab`` ids (default: all of it; see :mod:`.base`).

        Returns:
            :class:`GradOut`: ``dx`` ``[M, D]`` x.dtype, ``dw`` ``[V, D]`` fp32, ``db`` ``[V]``
            fp32 or None.
        """
        x, w, b, y = self._prep(x, w, b, y)
        f32 = torch.float32
        row_max, lse = row_max.to(f32).contiguous(), lse.to(f32).contiguous()
        row_scale = row_scale.to(f32).contiguous()
        return GradOut(*self._vocab_blocked_grad(x, w, b, y, row_max, lse, row_scale, cfg, w.dtype,
                                                 vocab_start=vocab_start, vocab=vocab))

    # ----------------------------------------------------------------- internals
    @staticmethod
    def _stats(x, w, b, y, cfg, out, row_select: RowSelect | None = None) -> torch.Tensor | None:
        """Statistics ``[5, M]`` of rows that need no gradient (see :data:`STATS_MODE`); with
        ``row_select``, returns the bool ``[M]`` selection it made chunk by chunk (else None)."""
        k = _load_kernels()
        if row_select is None and (k.INTERPRETED or not x.is_cuda or STATS_MODE == "fused"):
            k.fused_stats(x, w, b, y, cfg.softcap, out)
            return None
        M, V = x.shape[0], w.shape[0]
        sel = None if row_select is None else torch.zeros(M, dtype=torch.bool, device=x.device)
        rows = _rows_per_chunk(M, V, cfg, _logits_dtype(x, b, cfg))
        buf, _ = _logits_buffers(rows, V, x, b, cfg, grad=False)
        for s, e in spans(M, rows):
            g = buf[: e - s]
            _logits_mm(g, x[s:e], w.t())
            k.rows_pass(g, b, y[s:e], softcap=cfg.softcap, z_loss=0.0, label_smoothing=0.0,
                        stats_out=out[:, s:e], grad=False)
            if sel is not None:
                sel[s:e] = select_rows(row_select, s, e, RowStats(*out[:, s:e].unbind(0)))
        return sel

    @staticmethod
    def _prep(x, w, b, y):
        """Unit stride along the feature / vocabulary dims (what the kernels index)."""
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = w if w.stride(-1) == 1 else w.contiguous()
        b = b.contiguous() if b is not None else None
        return x, w, b, y.contiguous()

    @staticmethod
    def _grad_gemms(g, xs, w, dx_out, dw, db) -> None:
        """dx = G @ W into ``dx_out``; dW += G^T @ X (fp32); db += sum of G's rows (fp32)."""
        torch.mm(g, w, out=dx_out)
        _mm_f32(dw, g.t(), xs, accumulate=True)
        if db is not None:
            db += g.sum(0, dtype=torch.float32)

    def _vocab_blocked_grad(self, x, w, b, y, row_max, lse, row_scale, cfg, dw_dtype, *,
                            vocab_start: int = 0, vocab: int | None = None):
        """Gradient of ``sum_i row_scale[i] * loss_i`` (scale 1 when None) by vocabulary blocks.

        ``row_max``, ``lse``: ``[n]`` fp32, as :class:`RowStats` names them. Each block
        of ``vb`` columns ``[v0, v1)`` and ``rc`` rows: logits ``x @ w[v0:v1].T``, the row
        kernel turns them into the gradient (in place, or into the half buffer after fp32
        logits, see :func:`_logits_buffers`), ``dx += G @ w[v0:v1]`` (fp32) and ``dW[v0:v1] (+)= G^T @ x``. With up to
        ``sqrt(budget)`` gradient rows every vocabulary block holds all of them, so dW is
        formed in one GEMM per block and written once. Returns
        ``(dx x.dtype, dw, db fp32 or None)``; ``dw`` is ``dw_dtype`` when one GEMM formed each
        block (fp32 accumulation inside it), else fp32.
        """
        k = _load_kernels()
        n, D = x.shape
        V = w.shape[0]
        dev = x.device
        db = torch.zeros(V, dtype=torch.float32, device=dev) if b is not None else None
        if n == 0:
            return x.new_empty(0, D), torch.zeros(V, D, dtype=dw_dtype, device=dev), db
        # blocks of rc rows x vb columns (the one plan, backends/_plan.py); the block width is
        # the buffer's row stride, 128-aligned for cuBLAS
        rc, vb = vocab_blocks(n, V, cfg, _logits_dtype(x, b, cfg))
        one_gemm = rc >= n
        dx = torch.zeros(n, D, dtype=torch.float32, device=dev)
        dw = torch.empty(V, D, dtype=dw_dtype if one_gemm else torch.float32, device=dev)
        if not one_gemm:
            dw.zero_()
        buf, gbuf = _logits_buffers(min(rc, n), vb, x, b, cfg)
        opts = dict(softcap=cfg.softcap, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)
        for v0, v1 in spans(V, vb):
            wb = w[v0:v1]
            bb = b[v0:v1] if b is not None else None
            for s, e in spans(n, rc):
                z = buf[: e - s, : v1 - v0]  # row stride vb (aligned) also for the last block
                _logits_mm(z, x[s:e], wb.t())
                g = z if gbuf is None else gbuf[: e - s, : v1 - v0]
                k.rows_pass(z, bb, y[s:e], row_max=row_max[s:e], lse=lse[s:e],
                            row_scale=None if row_scale is None else row_scale[s:e],
                            v_off=vocab_start + v0, vocab=V if vocab is None else vocab, out=g,
                            **opts)
                _mm_f32(dx[s:e], g, wb, accumulate=True)
                _mm_f32(dw[v0:v1], g.t(), x[s:e], accumulate=not one_gemm)
                if db is not None:
                    db[v0:v1] += g.sum(0, dtype=torch.float32)
        return dx.to(x.dtype), dw, db

    def _grad_sweep(self, x, w, b, y, cfg, stats, n, row_select: RowSelect | None = None):
        """Row chunks of the first ``n`` rows through the logits buffer: statistics into
        ``stats`` and the gradient of every row, or of the rows ``row_select`` picks chunk by
        chunk. Returns ``(dx, dw, db, sel)``: ``sel`` bool ``[n]`` with ``row_select``, else None."""
        k = _load_kernels()
        V, D = w.shape
        dev = x.device
        dw = torch.zeros(V, D, dtype=torch.float32, device=dev)
        db = torch.zeros(V, dtype=torch.float32, device=dev) if b is not None else None
        rows = _rows_per_chunk(n, V, cfg, _logits_dtype(x, b, cfg))
        buf, gbuf = _logits_buffers(rows, V, x, b, cfg)
        opts = dict(softcap=cfg.softcap, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)
        sel = None
        if row_select is None:
            dx = torch.empty(n, D, dtype=x.dtype, device=dev)
        else:
            sel = torch.zeros(n, dtype=torch.bool, device=dev)
            dx_parts: list[torch.Tensor] = []
        for s, e in spans(n, rows):
            z = buf[: e - s]
            _logits_mm(z, x[s:e], w.t())
            g = z if gbuf is None else gbuf[: e - s]
            if row_select is None:
                k.rows_pass(z, b, y[s:e], stats_out=stats[:, s:e], out=g, **opts)
                self._grad_gemms(g, x[s:e], w, dx[s:e], dw, db)
                continue
            k.rows_pass(z, b, y[s:e], stats_out=stats[:, s:e], grad=False, **opts)
            chunk = RowStats(*stats[:, s:e].unbind(0))
            m = select_rows(row_select, s, e, chunk)
            sel[s:e] = m
            idx = m.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            k.rows_pass(z, b, y[s:e], row_max=chunk.row_max, lse=chunk.lse, rows=idx, out=g, **opts)
            full = idx.numel() == e - s
            gs = g if full else g.index_select(0, idx)
            xs = x[s:e] if full else x[s:e].index_select(0, idx)
            part = torch.empty(idx.numel(), D, dtype=x.dtype, device=dev)
            self._grad_gemms(gs, xs, w, part, dw, db)
            dx_parts.append(part)
        if row_select is not None:
            dx = torch.cat(dx_parts) if dx_parts else x.new_empty(0, D)
        return dx, dw, db, sel
