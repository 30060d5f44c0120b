"""Pure-PyTorch backend: runs on any device; the readable reference and the test suite's second
oracle. Its per-row primitives are plain tensor code; the driver (:mod:`.driver`) chunks the
work so no more than one chunk of logits is held.
"""

from __future__ import annotations

import torch

from .base import CEConfig, RowStats
from .driver import DriverBackend, acc_dtype


def _epilogue(z: torch.Tensor, b: torch.Tensor | None, cfg: CEConfig) -> torch.Tensor:
    """A new tensor of the logits ``z`` in the accumulation dtype, plus the bias ``b`` (the
    block's columns) and after the optional softcap."""
    zf = z.to(acc_dtype(z.dtype), copy=True)
    if b is not None:
        zf += b.to(zf.dtype)
    if cfg.softcap is not None:
        zf.div_(cfg.softcap).tanh_().mul_(cfg.softcap)
    return zf


def _dlogits_(p, zc, row_max, lse, scale, gold_col, gold_hit, V: int, cfg: CEConfig) -> torch.Tensor:
    """Turn the softmax ``p`` [r, c] into d(scale * loss)/d(raw logits), in place.

    ``zc`` are the logits minus ``row_max``, ``lse`` is relative to ``row_max`` (see
    :mod:`.base`); ``gold_col`` is each row's gold column in this block and ``gold_hit``
    (0 / 1) whether it lies in the block.
    """
    if cfg.z_loss:
        p.mul_((1.0 + 2.0 * cfg.z_loss * (row_max + lse)).unsqueeze(1))
    if cfg.label_smoothing:
        p.sub_(cfg.label_smoothing / V)
    rows = torch.arange(p.shape[0], device=p.device)
    onehot = (1.0 - cfg.label_smoothing) * gold_hit
    p[rows, gold_col.clamp(0, p.shape[1] - 1)] -= onehot
    if cfg.softcap is not None:
        # d/draw [c * tanh(raw / c)] = 1 - tanh^2 = 1 - (z / c)^2
        p.mul_(1.0 - ((zc + row_max.unsqueeze(1)) / cfg.softcap).square_())
    if scale is not None:
        p.mul_(scale.unsqueeze(1))
    return p


class TorchBackend(DriverBackend):
    """The reference implementation of the row primitives (see :mod:`.driver`)."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return True, ""

    def row_stats(self, z: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None, cfg: CEConfig) -> RowStats:
        """Statistics of the raw logits ``z`` ``[r, V]`` (bias ``b`` ``[V]``), relative to the row
        maximum, in the accumulation dtype."""
        zf = _epilogue(z, b, cfg)
        m = zf.amax(dim=1)
        zf.sub_(m.unsqueeze(1))  # relative to the row max from here on
        p = torch.exp(zf)
        s = p.sum(1)
        lse = s.log()
        p.div_(s.unsqueeze(1))  # softmax
        return RowStats(
            row_max=m,
            lse=lse,
            gold=zf.gather(1, y.unsqueeze(1)).squeeze(1),
            # 0 log 0 = 0: p * z is NaN only where p = 0 and z = -inf (a NaN logit makes lse NaN)
            entropy=lse - (p * zf).nansum(1),
            sum_logits=zf.sum(1),
        )

    def row_grad_(self, z, y, row_max, lse, scale, b, db, v0: int, vocab_start: int, vocab: int,
                  cfg: CEConfig, out) -> None:
        """``out`` := ``scale * d loss / d raw`` of the columns ``[v0, v0 + C)`` (driver contract)."""
        C = z.shape[1]
        zc = _epilogue(z, None if b is None else b[v0:v0 + C], cfg).sub_(row_max.unsqueeze(1))
        p = torch.exp(zc - lse.unsqueeze(1))
        col = y - (vocab_start + v0)
        hit = ((col >= 0) & (col < C)).to(p.dtype)
        dz = _dlogits_(p, zc, row_max, lse, scale, col, hit, vocab, cfg)
        if db is not None:
            db[v0:v0 + C] += dz.sum(0)
        out.copy_(dz)
