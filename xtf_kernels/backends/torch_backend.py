"""Chunked pure-PyTorch backend: runs on any device, never holds more than one chunk of logits.

Readable by design: it is also the second oracle of the test suite. The forward walks row
chunks over the full vocabulary (``chunk_rows x V`` fp32 logits at a time); the backward
recompute walks vocabulary blocks with one GEMM over all kept rows per block, so every
block of dW is accumulated in fp32 inside a single GEMM.
"""

from __future__ import annotations

import torch

from ._gemm import add_mm, f32_epilogue, fast_f32_gemm, mm_f32
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


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cfg: CEConfig) -> torch.Tensor:
    """fp32 logits of ``x @ w.T (+ b)`` after the optional softcap, shape [rows, cols].

    Half-precision inputs with a bias or softcap keep the GEMM result in fp32 through the
    epilogue on CUDA (see :mod:`._gemm`); otherwise (and on the CPU, like the native backend)
    the GEMM output is rounded to ``x.dtype`` first, as ``F.linear`` does.
    """
    if f32_epilogue(x.dtype, b is not None, cfg.softcap) and fast_f32_gemm(x.device):
        z = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
        mm_f32(z, x, w.t(), accumulate=False)
    else:
        z = (x @ w.t()).to(_acc(x.dtype))
    if b is not None:
        z += b.to(z.dtype)
    if cfg.softcap is not None:
        z.div_(cfg.softcap).tanh_().mul_(cfg.softcap)
    return z


def _dlogits_(
    p: torch.Tensor,
    zc: torch.Tensor,
    row_max: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor | None,
    gold_col: torch.Tensor,
    gold_hit: torch.Tensor | None,
    V: int,
    cfg: CEConfig,
) -> torch.Tensor:
    """Turn the softmax ``p`` [r, c] into d(scale * loss)/d(raw logits), in place.

    ``zc`` are the logits minus ``row_max`` and ``lse`` is relative to ``row_max`` (see
    :mod:`.base`). ``gold_col`` holds, per row, the column of the gold token inside this
    block; ``gold_hit`` says which rows have their gold token in the block (None: all).
    """
    if cfg.z_loss:
        p.mul_((1.0 + 2.0 * cfg.z_loss * (row_max + lse)).unsqueeze(1))
    if cfg.label_smoothing:
        p.sub_(cfg.label_smoothing / V)
    rows = torch.arange(p.shape[0], device=p.device)
    onehot = torch.full((p.shape[0],), 1.0 - cfg.label_smoothing, device=p.device, dtype=p.dtype)
    if gold_hit is not None:
        onehot = onehot * gold_hit
        gold_col = gold_col.clamp(0, p.shape[1] - 1)
    p[rows, gold_col] -= onehot
    if cfg.softcap is not None:
        # d/draw [c * tanh(raw / c)] = 1 - tanh^2 = 1 - (z / c)^2
        p.mul_(1.0 - ((zc + row_max.unsqueeze(1)) / cfg.softcap).square_())
    if scale is not None:
        p.mul_(scale.unsqueeze(1))
    return p


class TorchBackend(BackendBase):
    """The reference chunked implementation (see :mod:`xtf_kernels.backends.base`)."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return True, ""

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
        def grad_rows(s: int, e: int, st: RowStats) -> torch.Tensor:
            return torch.arange(max(0, min(e, n_grad) - s), device=x.device)

        return self._sweep(x, w, b, y, cfg, grad_rows if n_grad else None)

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
        statistics while its logits are still in memory, so a per-token rule (the XTF KN rule,
        an entropy or excess-loss threshold) costs one logits GEMM in total. Returns the
        forward output (``dx`` for the selected rows, in row order) and the bool [M] selection.
        """
        sel = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

        def grad_rows(s: int, e: int, st: RowStats) -> torch.Tensor:
            m = select_rows(row_select, s, e, st)
            sel[s:e] = m
            return m.nonzero().squeeze(1)

        return self._sweep(x, w, b, y, cfg, grad_rows), sel

    def _sweep(self, x, w, b, y, cfg: CEConfig, grad_rows) -> ForwardOut:
        """Row chunks over the full vocabulary: statistics, and the gradient of the rows
        ``grad_rows(start, end, chunk RowStats) -> int64 [k]`` chooses (None: no gradient)."""
        M, D = x.shape
        V = w.shape[0]
        dev = x.device
        acc = _acc(x.dtype)
        out = RowStats.empty(M, device=dev, dtype=acc)
        want = grad_rows is not None
        dx_parts: list[torch.Tensor] = []
        dw = torch.zeros(V, D, device=dev, dtype=acc) if want else None
        db = torch.zeros(V, device=dev, dtype=acc) if (want and b is not None) else None
        for s, e in spans(M, rows_per_chunk(M, V, cfg, acc)):
            z = _logits(x[s:e], w, b, cfg)
            c_max = z.amax(dim=1)
            z.sub_(c_max.unsqueeze(1))  # relative to the row max from here on
            p = torch.exp(z)
            c_sum = p.sum(1)
            c_lse = c_sum.log()
            p.div_(c_sum.unsqueeze(1))  # softmax
            st = RowStats(
                row_max=c_max,
                lse=c_lse,
                gold=z.gather(1, y[s:e].unsqueeze(1)).squeeze(1),
                # 0 log 0 = 0: p * z is NaN only where p = 0 and z = -inf (a NaN logit makes lse NaN)
                entropy=c_lse - (p * z).nansum(1),
                sum_logits=z.sum(1),
            )
            out.put(s, e, st)
            if want:
                g = grad_rows(s, e, st)
                if g.numel():
                    full = g.numel() == e - s
                    pg = p if full else p.index_select(0, g)
                    zg = z if full else z.index_select(0, g)
                    xg = x[s:e] if full else x[s:e].index_select(0, g)
                    dz = _dlogits_(pg, zg, c_max.index_select(0, g), c_lse.index_select(0, g), None,
                                   y[s:e].index_select(0, g), None, V, cfg)
                    dzc = dz.to(x.dtype)
                    dx_parts.append(dzc @ w)
                    add_mm(dw, dzc.t(), xg)
                    if db is not None:
                        db += dz.sum(0)
            del z, p
        dx = None
        if want:
            dx = torch.cat(dx_parts) if dx_parts else x.new_empty(0, D)
        return ForwardOut.of(out, dx, dw, db)

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
        M, D = x.shape
        V = w.shape[0]  # the shard's width; ``vocab`` (default V) is the whole vocabulary's
        n_vocab = V if vocab is None else vocab
        y = y - vocab_start if vocab_start else y  # gold ids relative to the shard
        dev = x.device
        acc = _acc(x.dtype)
        dx_acc = torch.zeros(M, D, device=dev, dtype=acc)
        dw = torch.empty(V, D, device=dev, dtype=w.dtype)
        db = torch.empty(V, device=dev, dtype=acc) if b is not None else None
        if M == 0:
            dw.zero_()
            if db is not None:
                db.zero_()
            return GradOut(dx_acc.to(x.dtype), dw, db)
        # the one recompute plan (backends/_plan.py); rows chunked only when M alone exceeds it
        rc, vb = vocab_blocks(M, V, cfg, acc)
        for v0, v1 in spans(V, vb):
            wb = w[v0:v1]
            bb = b[v0:v1] if b is not None else None
            dw_blk = torch.zeros(v1 - v0, D, device=dev, dtype=acc) if rc < M else None
            for s, e in spans(M, rc):
                z = _logits(x[s:e], wb, bb, cfg)
                z.sub_(row_max[s:e].unsqueeze(1))
                p = torch.exp(z - lse[s:e].unsqueeze(1))
                ys = y[s:e]
                hit = ((ys >= v0) & (ys < v1)).to(acc)
                dz = _dlogits_(p, z, row_max[s:e], lse[s:e], row_scale[s:e], ys - v0, hit, n_vocab, cfg)
                dzc = dz.to(x.dtype)
                add_mm(dx_acc[s:e], dzc, wb)
                part = dzc.t() @ x[s:e]
                if dw_blk is None:
                    dw[v0:v1] = part
                else:
                    dw_blk += part.to(acc)
                if db is not None:
                    if s == 0:
                        db[v0:v1] = dz.sum(0)
                    else:
                        db[v0:v1] += dz.sum(0)
                del z, p
            if dw_blk is not None:
                dw[v0:v1] = dw_blk
        return GradOut(dx_acc.to(x.dtype), dw, db)
