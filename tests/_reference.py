"""Unfused reference of masked_ce: materialised logits and plain PyTorch ops.

Run in float64 it is the ground truth; run in the input dtype it is "same-dtype PyTorch",
the yardstick of the error criterion |ref - ours| <= |ref - same_dtype_torch| + tol.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_masked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    ref_logprobs: torch.Tensor | None = None,
    task_vector: torch.Tensor | None = None,
    select=None,
    dtype: torch.dtype = torch.float64,
):
    """Returns (loss, stats dict) computed with materialised [N, V] logits in ``dtype``."""
    h = hidden.to(dtype)
    w = weight.to(dtype)
    D = h.shape[-1]
    lead = tuple(labels.shape)
    y = labels.reshape(-1)
    h2 = h.reshape(-1, D)
    if shift:
        L = lead[-1]
        pos = torch.arange(y.numel())
        first = (pos % L) == 0
        src = torch.clamp(pos - 1, min=0)
        h2 = h2[src]
        valid = (y != ignore_index) & ~first
    else:
        valid = y != ignore_index
    z = h2 @ w.t()
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    acc = z.float() if dtype in (torch.float16, torch.bfloat16) else z
    lse = torch.logsumexp(acc, -1)
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    gold = acc.gather(1, safe_y[:, None]).squeeze(1)
    p = torch.softmax(acc, -1)
    ent = lse - torch.where(p > 0, p * acc, 0.0).sum(-1)  # 0 log 0 = 0 (-inf logits)
    logprob = gold - lse
    nan = torch.tensor(float("nan"), dtype=acc.dtype)
    stats = {
        "logprob": torch.where(valid, logprob, nan),
        "prob": torch.where(valid, logprob.exp(), nan),
        "entropy": torch.where(valid, ent, nan),
        "lse": torch.where(valid, lse, nan),
    }
    stats["logprob_delta"] = (
        None if ref_logprobs is None else stats["logprob"] - ref_logprobs.reshape(-1).to(acc.dtype)
    )
    stats["relevance"] = (
        None
        if task_vector is None
        else torch.where(
            valid, F.cosine_similarity(h2.to(acc.dtype), task_vector.to(acc.dtype)[None], dim=1), nan
        )
    )
    kept = valid.clone()
    if keep is not None:
        kept &= keep.reshape(-1)
    if select is not None:
        from xtf_kernels import TokenStats

        ts = TokenStats(
            **{k: (None if v is None else v.reshape(lead)) for k, v in stats.items()},
            keep=kept.reshape(lead),
        )
        kept &= select(ts).reshape(-1)
    stats["keep"] = kept
    target = torch.where(kept, y, torch.full_like(y, -100))
    tok = F.cross_entropy(acc, target, reduction="none", ignore_index=-100, label_smoothing=label_smoothing)
    if z_loss:
        tok = tok + z_loss * lse.square() * kept
    tok = torch.where(kept, tok, torch.zeros((), dtype=tok.dtype))
    if reduction == "none":
        loss = tok.reshape(lead)
    elif reduction == "sum":
        loss = tok.sum()
    else:
        div = num_items if num_items is not None else max(int(kept.sum()), 1)
        loss = tok.sum() / div
    stats = {k: (None if v is None else v.reshape(lead)) for k, v in stats.items()}
    return loss, stats


def absolute_stats(fo, V: int) -> dict:
    """A backend's ``ForwardOut`` statistics in absolute terms, float64 on the CPU.

    Backends return ``lse``, ``gold`` and ``sum_logits`` relative to ``row_max`` (see
    ``xtf_kernels/backends/base.py``); comparing backends of different precisions compares
    these reconstructions, plus ``logprob = gold - lse`` formed from the relative values.
    The sum of logits is compared as the mean logit, the scale at which it enters the loss
    (label smoothing's ``ls * sum / V``).
    """
    m = fo.row_max.double().cpu()
    lse, gold = fo.lse.double().cpu(), fo.gold.double().cpu()
    return {
        "lse": m + lse,
        "gold": m + gold,
        "logprob": gold - lse,
        "entropy": fo.entropy.double().cpu(),
        "mean_logit": fo.sum_logits.double().cpu() / V + m,
    }
