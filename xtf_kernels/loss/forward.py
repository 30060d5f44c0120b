"""One masked_ce forward, from the call's tensors to :class:`MaskedCEOutputs` and what the
backward needs (:class:`ForwardResult`). Shared by the autograd Function and the custom op.

Three gradient plans (:data:`GradState`): nothing kept (:class:`ZeroGrad`), the gradient formed
during the forward with a unit upstream gradient (:class:`FormedGrad`, three GEMMs per kept
row), or the kept rows recomputed in the backward (:class:`RecomputeGrad`, four GEMMs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..backends import Backend, CEConfig, resolve_backend
from ..stats import TokenStats
from .core import (
    Need,
    RecomputeGrad,
    RowStats,
    at_positions,
    positions,
    reduce_loss,
    relevance,
    row_order,
    scatter_stats,
    token_loss,
    token_stats,
)
from .select import apply_select, chunk_selector, is_rowwise
from .spec import MaskedCEOutputs, MaskedCESpec
from .validate import check_labels_in_range
from .vocab_parallel import shard_stats


class ZeroGrad(NamedTuple):
    """Nothing kept: zero gradients shaped like these."""

    hidden_rows: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


class FormedGrad(NamedTuple):
    """Gradient of ``sum loss_i`` formed in the forward (``dw``/``db`` are scaled in place later)."""

    src_kept: torch.Tensor
    dx: torch.Tensor
    divisor: torch.Tensor | None
    dw: torch.Tensor
    db: torch.Tensor | None


GradState = ZeroGrad | FormedGrad | RecomputeGrad | None


class ForwardResult(NamedTuple):
    outputs: MaskedCEOutputs
    grad: GradState
    backend: Backend
    cfg: CEConfig


class _Sweep(NamedTuple):
    """The backend's answer, with the final keep mask when a rowwise rule chose it."""

    stats: RowStats  # at label positions [N]
    relevance: torch.Tensor | None  # [M] of the compacted rows (task_vector given), else None
    rows: torch.Tensor  # the compacted rows' label positions
    kept: torch.Tensor  # flat [N] keep mask
    kept_pos: torch.Tensor | None  # label positions of the gradient rows (None: select pending)
    fo_grad: tuple | None  # (dx, dw, db) formed in the forward, else None
    skipped: torch.Tensor | None  # the gradient filter's mass per gradient row (formed now), else None


def run_forward(
    *,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    task_vector: torch.Tensor | None,
    num_items,
    spec: MaskedCESpec,
    need: Need,
) -> ForwardResult:
    """The forward of masked_ce on validated inputs (``labels`` int64, ``spec`` resolved)."""
    lead = tuple(labels.shape)
    dev = hidden.device
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    y = labels.reshape(-1)
    pos = positions(labels, keep, ignore_index=spec.ignore_index, shift=spec.shift)
    shard = spec.vocab_shard
    vocab = weight.shape[0] if shard is None else shard.vocab
    if spec.check_labels:
        check_labels_in_range(y, pos.valid, vocab, spec.ignore_index)
    backend = resolve_backend(spec.backend, dev, hidden.dtype)
    cfg = spec.ce_config()
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    sweep = _sweep(backend=backend, cfg=cfg, spec=spec, hidden_rows=hidden_rows, w=w, b=b, y=y, pos=pos, need=need,
                ref_logprobs=ref_logprobs, task_vector=task_vector, acc=acc)
    stats, kept = sweep.stats, sweep.kept
    rel = None if sweep.relevance is None else at_positions(sweep.relevance, rows=sweep.rows, n_tok=y.numel(), acc=acc)
    ts = token_stats(stats, keep=kept, relevance=rel,
                     ref_logprobs=None if ref_logprobs is None else ref_logprobs.reshape(-1).to(acc))
    ts = TokenStats(*(None if t is None else t.view(lead) for t in ts))
    kept_pos = sweep.kept_pos
    if kept_pos is None:  # a global select rule sees every token's statistics
        kept = apply_select(spec.select, ts._replace(keep=ts.keep.clone()), kept)
        kept_pos = kept.nonzero().squeeze(1)
    n_kept = kept_pos.numel()
    tok = token_loss(stats, kept, label_smoothing=spec.label_smoothing, z_loss=spec.z_loss, vocab=vocab)
    loss, divisor = reduce_loss(tok, reduction=spec.reduction, num_items=num_items, n_kept=n_kept,
                                shape=lead)
    grad = _grad_state(need=need, n_kept=n_kept, fo_grad=sweep.fo_grad, src=pos.src, kept_pos=kept_pos,
                       hidden_rows=hidden_rows, w=w, b=b, y=y, stats=stats, divisor=divisor)
    empty = torch.empty(0, device=dev)
    outputs = MaskedCEOutputs(
        loss=loss,
        logprob=ts.logprob,
        prob=ts.prob,
        entropy=ts.entropy,
        lse=ts.lse,
        logprob_delta=empty if ts.logprob_delta is None else ts.logprob_delta,
        relevance=empty if ts.relevance is None else ts.relevance,
        keep=kept.view(lead),
        lse_parts=torch.stack((stats.row_max, stats.lse)).view(2, *lead),
    )
    if spec.grad_skipped_out is not None and sweep.skipped is not None:  # formed now: report now
        spec.grad_skipped_out.view(-1)[kept_pos] = sweep.skipped.to(spec.grad_skipped_out.dtype)
    return ForwardResult(outputs=outputs, grad=grad, backend=backend, cfg=cfg)


def _sweep(*, backend, cfg, spec, hidden_rows, w, b, y, pos, need, ref_logprobs, task_vector, acc) -> _Sweep:
    """Compact the scored rows (kept first) and run the backend's forward over them."""
    rows, n_kept = row_order(pos, with_masked=spec.select is not None or spec.stats)
    x = hidden_rows.index_select(0, pos.src.index_select(0, rows))
    ys = y.index_select(0, rows)
    scalar_grad = any(need) and spec.reduction != "none" and spec.grad_in_forward
    kept = pos.kept
    rel = None if task_vector is None else relevance(x, task_vector, acc=acc)
    if spec.vocab_shard is not None:
        # vocabulary-parallel: the global statistics need all ranks' sweeps, so the gradient is
        # recomputed in the backward and every select rule sees the whole statistics
        stats = shard_stats(backend, x, w, b, ys, cfg, spec.vocab_shard)
        kept_pos = rows[:n_kept] if spec.select is None else None
        stats = scatter_stats(stats, rows=rows, n_tok=y.numel(), acc=acc)
        return _Sweep(stats=stats, relevance=rel, rows=rows, kept=kept, kept_pos=kept_pos, fo_grad=None,
                      skipped=None)
    if scalar_grad and is_rowwise(spec.select):
        # a per-token select rule is applied chunk by chunk while the logits are in memory:
        # statistics, selection and gradient from one logits GEMM
        row_select = chunk_selector(spec.select, rows=rows, kept=kept, ref_logprobs=ref_logprobs,
                                    relevance=rel, acc=acc)
        fwd_out, sel = backend.forward_rowwise(x, w, b, ys, cfg, row_select)
        kept_pos = rows[sel]
        kept = torch.zeros_like(kept)
        kept[kept_pos] = True
        grad_now = True
    else:
        grad_now = scalar_grad and spec.select is None
        fwd_out = backend.forward(x, w, b, ys, cfg, n_kept if grad_now else 0)
        kept_pos = rows[:n_kept] if spec.select is None else None
    stats = scatter_stats(fwd_out.stats, rows=rows, n_tok=y.numel(), acc=acc)
    fo_grad = (fwd_out.dx, fwd_out.dw, fwd_out.db) if grad_now else None
    return _Sweep(stats=stats, relevance=rel, rows=rows, kept=kept, kept_pos=kept_pos, fo_grad=fo_grad,
                  skipped=fwd_out.skipped if grad_now else None)


def _grad_state(*, need, n_kept, fo_grad, src, kept_pos, hidden_rows, w, b, y, stats, divisor) -> GradState:
    if not any(need):
        return None
    if n_kept == 0:
        return ZeroGrad(hidden_rows=hidden_rows[:0], weight=w, bias=b)
    src_kept = src.index_select(0, kept_pos)
    if fo_grad is not None:
        dx, dw, db = fo_grad
        return FormedGrad(src_kept=src_kept, dx=dx, divisor=divisor, dw=dw, db=db)
    return RecomputeGrad(
        src_kept=src_kept, hidden_rows=hidden_rows, weight=w, bias=b, labels_kept=y.index_select(0, kept_pos),
        row_max_kept=stats.row_max.index_select(0, kept_pos), lse_kept=stats.lse.index_select(0, kept_pos),
        kept_pos=kept_pos, divisor=divisor,
    )
