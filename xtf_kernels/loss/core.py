"""The backend-independent math of masked_ce, as plain functions (no autograd, no global state).

Label positions and row compaction (:func:`positions`, :func:`row_order`), scattering the
backends' per-row statistics back to label positions (:func:`scatter_stats`), the public
:class:`~xtf_kernels.stats.TokenStats` of them (:func:`token_stats`, the one place), the loss
formula (:func:`token_loss`), reductions (:func:`reduce_loss`), and the gradients
(:func:`recompute_grads`, :func:`formed_grads`). :mod:`.forward` strings them into one
forward; the autograd Function and the torch.library custom ops are thin layers over both.
Every statistic arrives relative to its row's logit maximum (see
:mod:`xtf_kernels.backends.base`): the loss and ``logprob`` never subtract two full-magnitude
numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..backends.base import Backend, CEConfig, RowStats
from ..documents import counted_mask
from ..stats import TokenStats
from .vocab_parallel import shard_grads

__all__ = ["RowStats"]  # re-exported: the statistics at label positions have the backends' type


class Positions(NamedTuple):
    """Flat ``[N]`` views of the label positions (``N = labels.numel()``)."""

    valid: torch.Tensor  #: bool: scored (not ignore_index, and predicted under the shift)
    kept: torch.Tensor  #: bool: scored and kept (these enter the loss)
    src: torch.Tensor  #: int64: the flat hidden row that predicts each label position


def positions(labels: torch.Tensor, keep: torch.Tensor | None, *, ignore_index: int,
              shift: bool) -> Positions:
    """Which label positions are scored and kept, and the hidden row predicting each.

    With ``shift`` the label at ``t`` is predicted from ``hidden[..., t - 1, :]``; position 0
    of every sequence has no predictor and is not scored. The rule is the package's one
    kept-token rule (:func:`xtf_kernels.documents.counted_mask`, also behind
    ``count_kept_tokens`` and the Trainer's ``num_items`` checks); packed rows reach here with
    their document starts already set to ``ignore_index`` (``masked_ce(position_ids=...)``).
    """
    valid = counted_mask(labels, ignore_index=ignore_index, shift=shift).reshape(-1)
    kept = valid if keep is None else valid & keep.reshape(-1)
    return Positions(valid=valid, kept=kept, src=source_rows(labels, shift=shift))


def source_rows(labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """``[N]`` the flat hidden row that predicts each label position (:attr:`Positions.src`)."""
    flat = torch.arange(labels.numel(), device=labels.device)
    return flat - 1 if shift else flat


def row_order(pos: Positions, *, with_masked: bool) -> tuple[torch.Tensor, int]:
    """(label positions in the order the backend sees their rows, number of kept rows).

    Kept rows first (the gradient rows are a prefix), then, when ``with_masked``, the scored
    but masked rows (statistics only).
    """
    kept_pos = pos.kept.nonzero().squeeze(1)
    if not with_masked:
        return kept_pos, kept_pos.numel()
    other = (pos.valid & ~pos.kept).nonzero().squeeze(1)
    return torch.cat([kept_pos, other]), kept_pos.numel()


def at_positions(values: torch.Tensor, *, rows: torch.Tensor, n_tok: int, acc: torch.dtype) -> torch.Tensor:
    """``[N]`` (``N = n_tok``) in ``acc``: ``values`` ``[M]`` at the label positions ``rows``
    ``[M]``, NaN elsewhere."""
    out = torch.full((n_tok,), float("nan"), dtype=acc, device=rows.device)
    out[rows] = values.to(acc)
    return out


def scatter_stats(st: RowStats, *, rows: torch.Tensor, n_tok: int, acc: torch.dtype) -> RowStats:
    """The backend's per-row statistics of ``rows`` (label positions) at their positions
    (:class:`RowStats` of ``[N]``, NaN where not scored)."""
    return RowStats(*(at_positions(f, rows=rows, n_tok=n_tok, acc=acc) for f in st))


def relevance(x: torch.Tensor, task_vector: torch.Tensor, *, acc: torch.dtype) -> torch.Tensor:
    """``[M]`` cosine(hidden row, task_vector) in ``acc`` of the rows ``x`` ``[M, D]`` (computed
    once per forward; the rowwise ``select`` chunks and the outputs share it)."""
    tv = task_vector.to(x.device, acc)
    return torch.nn.functional.cosine_similarity(x.to(acc), tv.unsqueeze(0), dim=1)


def token_stats(st: RowStats, *, keep: torch.Tensor, ref_logprobs: torch.Tensor | None = None,
                relevance: torch.Tensor | None = None) -> TokenStats:
    """The public :class:`TokenStats` of the statistics ``st`` (every tensor one shape, the
    keep mask ``keep`` bool, ``ref_logprobs`` / ``relevance`` fp32 or None):
    ``logprob = gold - lse`` and ``lse = row_max + lse`` (both exact relative to the row maximum)."""
    logprob = st.gold - st.lse
    return TokenStats(
        logprob=logprob,
        prob=logprob.exp(),
        entropy=st.entropy,
        lse=st.row_max + st.lse,
        logprob_delta=None if ref_logprobs is None else logprob - ref_logprobs,
        relevance=relevance,
        keep=keep,
    )


def token_loss(st: RowStats, kept: torch.Tensor, *, label_smoothing: float, z_loss: float,
               vocab: int) -> torch.Tensor:
    """``[N]`` per-token loss, 0 where not kept::

        lse - (1 - ls) * gold - ls * sum_logits / V + z_loss * (row_max + lse)**2
    """
    ls = float(label_smoothing)
    loss = st.lse - (1.0 - ls) * st.gold
    if ls:
        loss = loss - ls * st.sum_logits / vocab
    if z_loss:
        loss = loss + float(z_loss) * (st.row_max + st.lse).square()
    return torch.where(kept, loss, torch.zeros((), device=loss.device))


def reduce_loss(tok_loss: torch.Tensor, *, reduction: str, num_items, n_kept: int,
                shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, divisor of the mean or None). ``"none"``: the per-token loss with ``shape``.

    ``"mean"`` divides by ``num_items`` (default: the kept-token count); a batch with nothing
    kept gives 0.0 whatever ``num_items`` says. ``num_items = 0`` with kept tokens is an error
    (checked where the value can be read without a device sync).
    """
    if reduction == "none":
        return tok_loss.view(shape), None
    total = tok_loss.sum()
    if reduction == "sum":
        return total, None
    divisor = mean_divisor(num_items, n_kept=n_kept, dtype=tok_loss.dtype, device=tok_loss.device)
    return total / divisor, divisor


def mean_divisor(num_items, *, n_kept: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0-d ``dtype`` tensor: the divisor of ``reduction="mean"``, for the forward and for the
    custom op's backward alike. ``num_items`` (checked by
    :func:`.validate.check_num_items`), or the kept-token count when it is None; 1 when nothing
    is kept. ``num_items = 0`` with kept tokens is an error where it can be read without a
    device sync."""
    if num_items is None or n_kept == 0:
        return torch.as_tensor(max(n_kept, 1), dtype=dtype, device=device)
    divisor = torch.as_tensor(num_items, dtype=dtype, device=device)
    if divisor.device.type == "cpu" and float(divisor) == 0:
        raise ValueError(
            f"num_items: 0 while {n_kept} tokens are kept; expected the (global) kept-token count"
        )
    return divisor


def scatter_rows(rows: torch.Tensor, src: torch.Tensor, hidden_shape: tuple[int, ...]) -> torch.Tensor:
    """d_hidden: each kept row's gradient added at the hidden row that predicted it."""
    dh = rows.new_zeros((math.prod(hidden_shape[:-1]), hidden_shape[-1]))
    dh.index_add_(0, src, rows)
    return dh.view(hidden_shape)


class Need(NamedTuple):
    """Which gradients the caller wants."""

    hidden: bool
    weight: bool
    bias: bool


class RecomputeGrad(NamedTuple):
    """What a backward recompute of the kept rows needs (the autograd Function saves these
    tensors in this order; the custom op's backward rebuilds them)."""

    src_kept: torch.Tensor  #: [K] the hidden row of each kept row
    hidden_rows: torch.Tensor  #: [rows, D] the flat hidden
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels_kept: torch.Tensor  #: [K] int64
    row_max_kept: torch.Tensor  #: [K] fp32 logit maximum
    lse_kept: torch.Tensor  #: [K] fp32 log-sum-exp relative to it
    kept_pos: torch.Tensor  #: [K] the label position of each kept row
    divisor: torch.Tensor | None  #: of "mean", else None


def recompute_grads(g: RecomputeGrad, *, backend: Backend, cfg: CEConfig, reduction: str,
                    grad_loss: torch.Tensor, hidden_shape: tuple[int, ...], need: Need,
                    skipped_out: torch.Tensor | None = None, shard=None,
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias) by recomputing the logits of the kept rows ``g``.

    ``grad_loss`` is per token (``"none"``, the labels' shape) or a scalar, divided by
    ``g.divisor`` for ``"mean"``. ``skipped_out`` (labels' shape, fp32): receives the gradient
    filter's skipped mass at the kept positions. With ``shard`` (a vocabulary-parallel
    :class:`~xtf_kernels.loss.vocab_parallel.VocabShard`) ``g.weight`` is this rank's rows:
    ``d_weight`` / ``d_bias`` are theirs, ``d_hidden`` and the skipped mass are summed over
    the group.
    """
    hidden_rows, kept_pos, src_kept, divisor = g.hidden_rows, g.kept_pos, g.src_kept, g.divisor
    dtype = hidden_rows.dtype
    acc = g.lse_kept.dtype
    if reduction == "none":
        row_scale = grad_loss.reshape(-1).to(acc).index_select(0, kept_pos)
    else:
        scale = grad_loss.to(acc)
        if divisor is not None:
            scale = scale / divisor
        row_scale = scale.expand(kept_pos.numel()).contiguous()
    x = hidden_rows.index_select(0, src_kept)
    report = {}
    if skipped_out is not None and cfg.grad_filter is not None:
        report["skipped_out"] = torch.zeros(kept_pos.numel(), dtype=torch.float32, device=x.device)
    if shard is None:
        go = backend.backward(x, g.weight, g.bias, g.labels_kept, g.row_max_kept, g.lse_kept, row_scale, cfg,
                              **report)
    else:
        go = shard_grads(backend, x, g.weight, g.bias, g.labels_kept, g.row_max_kept, g.lse_kept, row_scale,
                         cfg, shard, need_dx=need.hidden, **report)
    if report:
        skipped_out.view(-1)[kept_pos] = report["skipped_out"].to(skipped_out.dtype)
    dh = scatter_rows(go.dx.to(dtype), src_kept, hidden_shape) if need.hidden else None
    dw = go.dw.to(dtype) if need.weight else None
    db = go.db.to(dtype) if (need.bias and go.db is not None) else None
    return dh, dw, db


def formed_grads(
    *,
    grad_loss: torch.Tensor,
    divisor: torch.Tensor | None,
    dx: torch.Tensor,
    dw: torch.Tensor,
    db: torch.Tensor | None,
    src_kept: torch.Tensor,
    hidden_shape: tuple[int, ...],
    need: Need,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias) from the unit-upstream gradient formed in the forward.

    ``dw`` and ``db`` are scaled in place (no second ``[V, D]`` buffer): the caller must not
    use them again.
    """
    scale = grad_loss.to(dw.dtype)
    if divisor is not None:
        scale = scale / divisor
    dtype = dx.dtype
    dh = scatter_rows((dx.to(dw.dtype) * scale).to(dtype), src_kept, hidden_shape) if need.hidden else None
    d_w = dw.mul_(scale).to(dtype) if need.weight else None
    d_b = db.mul_(scale).to(dtype) if (need.bias and db is not None) else None
    return dh, d_w, d_b


def zero_grads(*, hidden_shape: tuple[int, ...], hidden_rows: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, need: Need):
    """Zero gradients (nothing kept: no kernel launched)."""
    dh = torch.zeros(hidden_shape, dtype=hidden_rows.dtype, device=hidden_rows.device) if need.hidden else None
    dw = torch.zeros_like(weight) if need.weight else None
    db = torch.zeros_like(bias) if (need.bias and bias is not None) else None
    return dh, dw, db
