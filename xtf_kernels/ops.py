"""The fused linear + masked cross-entropy: :class:`MaskedCE` and its entry point :func:`masked_ce`.

Everything backend-independent lives here (see :mod:`xtf_kernels.backends.base` for the
split): flattening and the causal shift, ignore / keep / select, row compaction (only kept
rows ever reach the gradient code), the loss formula and reductions, and scattering the
per-token statistics back to the labels' shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._autograd import autocast_operands, first_order_only, no_autocast
from ._validate import check_labels_in_range, check_select_output, validate
from .backends import CEConfig, resolve_backend
from .config import get_options
from .documents import check_position_ids, mask_unpredicted
from .stats import TokenStats

SelectFn = Callable[[TokenStats], torch.Tensor]


@dataclass(frozen=True)
class MaskedCESpec:
    """Non-tensor arguments of :class:`MaskedCE` (see :func:`masked_ce` for their meaning)."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    shift: bool = False
    select: SelectFn | None = None
    backend: str = "auto"
    #: statistics wanted for masked (not kept) tokens too; False lets the forward skip them
    stats: bool = True


def _nan(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


class MaskedCE(torch.autograd.Function):
    """``torch.autograd.Function`` for the fused masked CE.

    ``MaskedCE.apply(hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items,
    spec)`` returns ``(loss, logprob, prob, entropy, lse, logprob_delta, relevance, keep,
    lse_parts)`` where the statistics are detached fp32 tensors with the labels' shape;
    ``logprob_delta`` and ``relevance`` are empty tensors when ``ref_logprobs`` /
    ``task_vector`` are None; ``lse_parts`` ``[2, *labels.shape]`` holds each row's logit
    maximum and its log-sum-exp relative to it (what a backward recompute needs at full
    precision). Inputs are not validated here (labels must be int64): :func:`masked_ce` is
    the validated entry point. Second-order gradients are refused (see
    :data:`xtf_kernels._autograd.SECOND_ORDER_MESSAGE`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        keep: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        task_vector: torch.Tensor | None,
        num_items: int | float | torch.Tensor | None,
        spec: MaskedCESpec,
    ):
        opts = get_options()
        lead = tuple(labels.shape)
        dev = hidden.device
        D = hidden.shape[-1]
        V = weight.shape[0]
        h2 = hidden.reshape(-1, D)
        y = labels.reshape(-1)
        n_tok = y.numel()
        valid, kept, src_all = _positions(labels, keep, spec.ignore_index, spec.shift)
        if opts.check_labels:
            check_labels_in_range(y, valid, V, spec.ignore_index)

        need_grad_in = ctx.needs_input_grad[:2] + (ctx.needs_input_grad[3],)
        need_grad = any(need_grad_in)
        need_stats = spec.select is not None or spec.stats
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        be = resolve_backend(spec.backend, dev, hidden.dtype)
        cfg = CEConfig(
            softcap=spec.softcap,
            label_smoothing=float(spec.label_smoothing),
            z_loss=float(spec.z_loss),
            chunk_elems=opts.chunk_elems,
        )
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else None

        # row order for the backend: kept rows first, then scored-but-masked rows
        kept_pos = kept.nonzero().squeeze(1)
        if need_stats:
            other_pos = (valid & ~kept).nonzero().squeeze(1)
            pos = torch.cat([kept_pos, other_pos])
        else:
            pos = kept_pos
        n_kept = kept_pos.numel()
        grad_now = (
            need_grad
            and spec.select is None
            and spec.reduction != "none"
            and opts.grad_in_forward
        )
        x = h2.index_select(0, src_all.index_select(0, pos))
        ys = y.index_select(0, pos)
        rowwise = (
            spec.select is not None
            and getattr(spec.select, "rowwise", False)
            and need_grad
            and spec.reduction != "none"
            and opts.grad_in_forward
            and hasattr(be, "forward_rowwise")
        )
        if rowwise:
            # a per-token select rule is applied chunk by chunk while the logits are in memory:
            # statistics, selection and gradient from one logits GEMM
            fo, sel = be.forward_rowwise(
                x, w, b, ys, cfg,
                _chunk_selector(spec.select, x, pos, kept, ref_logprobs, task_vector, acc),
            )
            kept_pos = pos[sel]
            kept = torch.zeros_like(kept)
            kept[kept_pos] = True
            n_kept = kept_pos.numel()
            grad_now = True
        else:
            fo = be.forward(x, w, b, ys, cfg, n_kept if grad_now else 0)

        # scatter statistics to label positions; lse_r, gold_r, zsum_r are relative to row_max
        # (a large common logit offset costs no precision in the loss and logprob)
        parts = _nan((5, n_tok), dev, acc)
        parts[:, pos] = torch.stack(fo[:5])
        row_max, lse_r, gold_r, ent, zsum_r = parts.unbind(0)
        lse = row_max + lse_r
        logprob = gold_r - lse_r
        prob = logprob.exp()
        delta = None
        if ref_logprobs is not None:
            delta = logprob - ref_logprobs.reshape(-1).to(acc)
        relevance = None
        if task_vector is not None:
            relevance = _nan((n_tok,), dev, acc)
            xs = x.to(acc)
            tv = task_vector.to(dev, acc)
            relevance[pos] = torch.nn.functional.cosine_similarity(xs, tv.unsqueeze(0), dim=1)

        if spec.select is not None and not rowwise:
            stats = TokenStats(
                logprob=logprob.view(lead),
                prob=prob.view(lead),
                entropy=ent.view(lead),
                lse=lse.view(lead),
                logprob_delta=None if delta is None else delta.view(lead),
                relevance=None if relevance is None else relevance.view(lead),
                keep=kept.view(lead).clone(),
            )
            sel = check_select_output(spec.select(stats), lead, dev)
            kept = kept & sel.reshape(-1)
            kept_pos = kept.nonzero().squeeze(1)
            n_kept = kept_pos.numel()

        # per-token loss on kept rows
        ls = float(spec.label_smoothing)
        tok_loss = lse_r - (1.0 - ls) * gold_r
        if ls:
            tok_loss = tok_loss - ls * zsum_r / V
        if spec.z_loss:
            tok_loss = tok_loss + float(spec.z_loss) * lse.square()
        tok_loss = torch.where(kept, tok_loss, torch.zeros((), device=dev))

        if spec.reduction == "none":
            loss = tok_loss.view(lead)
            divisor = None
        else:
            total = tok_loss.sum()
            if spec.reduction == "sum":
                loss = total
                divisor = None
            else:
                if num_items is None or n_kept == 0:
                    # nothing kept: loss 0.0 and zero gradients, whatever num_items says
                    divisor = torch.as_tensor(max(n_kept, 1), dtype=acc, device=dev)
                else:
                    divisor = torch.as_tensor(num_items, dtype=acc, device=dev)
                    if divisor.device.type == "cpu" and float(divisor) == 0:
                        raise ValueError(
                            f"num_items: 0 while {n_kept} tokens are kept; expected the (global) "
                            "kept-token count"
                        )
                loss = total / divisor

        ctx.spec = spec
        ctx.device_type = dev.type
        ctx.cfg = cfg
        ctx.be = be
        ctx.grad_now = grad_now
        ctx.hidden_shape = tuple(hidden.shape)
        ctx.n_kept = n_kept
        ctx.need_grad_in = need_grad_in
        if need_grad and n_kept == 0:
            ctx.zero_like = (h2[:0], w, b)
        elif need_grad:
            src_kept = src_all.index_select(0, kept_pos)
            if grad_now:
                ctx.save_for_backward(src_kept, fo.dx, divisor)
                # held as attributes, not saved tensors: backward scales them in place
                ctx.dw, ctx.db = fo.dw, fo.db
            else:
                ctx.save_for_backward(
                    src_kept, h2, w, b, y.index_select(0, kept_pos), row_max.index_select(0, kept_pos),
                    lse_r.index_select(0, kept_pos), kept_pos, divisor,
                )
        out_delta = delta.view(lead) if delta is not None else torch.empty(0, device=dev)
        out_rel = relevance.view(lead) if relevance is not None else torch.empty(0, device=dev)
        outs = (
            loss,
            logprob.view(lead),
            prob.view(lead),
            ent.view(lead),
            lse.view(lead),
            out_delta,
            out_rel,
            kept.view(lead),
            torch.stack((row_max, lse_r)).view(2, *lead),
        )
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        spec = ctx.spec
        need_h, need_w, need_b = ctx.need_grad_in
        if ctx.n_kept == 0:  # nothing kept: zero gradients, no kernel launched
            h2, w, b = ctx.zero_like
            return (
                torch.zeros(ctx.hidden_shape, dtype=h2.dtype, device=h2.device) if need_h else None,
                torch.zeros_like(w) if need_w else None,
                None, torch.zeros_like(b) if (need_b and b is not None) else None,
                None, None, None, None, None,
            )
        if ctx.grad_now:
            src_kept, dx_k, divisor = ctx.saved_tensors
            dw, db = ctx.dw, ctx.db
            if dw is None:
                raise RuntimeError(
                    "masked_ce: backward through the same graph a second time (retain_graph=True) "
                    "is not supported on the gradient-in-forward path, whose weight gradient is "
                    "handed out in place; run the forward under "
                    "xtf_kernels.options(grad_in_forward=False) for that"
                )
            ctx.dw = ctx.db = None  # handed out below: scaled in place, no second [V, D] buffer
            scale = grad_loss.to(dw.dtype)
            if divisor is not None:
                scale = scale / divisor
            dtype = dx_k.dtype
            dh = None
            if need_h:
                dh = _scatter_rows((dx_k.to(dw.dtype) * scale).to(dtype), src_kept, ctx.hidden_shape)
            dW = dw.mul_(scale).to(dtype) if need_w else None
            dB = db.mul_(scale).to(dtype) if (need_b and db is not None) else None
            return dh, dW, None, dB, None, None, None, None, None
        src_kept, h2, w, b, y_k, max_k, lse_k, kept_pos, divisor = ctx.saved_tensors
        dh, dW, dB = _recompute_grads(
            ctx.be, ctx.cfg, spec.reduction, grad_loss, divisor, h2, w, b, y_k, (max_k, lse_k),
            src_kept, kept_pos, ctx.hidden_shape, (need_h, need_w, need_b),
        )
        return dh, dW, None, dB, None, None, None, None, None


def rowwise(select: SelectFn) -> SelectFn:
    """Mark a ``select`` rule as per-token (its decision for a token depends only on that token).

    A rowwise rule receives :class:`TokenStats` of any shape (masked_ce calls it on chunks of
    1-D statistics while the chunk's logits are in memory) and must return a bool mask of
    that shape. Statistics, selection and gradient then come from ONE logits GEMM (the
    gradient is formed in the forward). Threshold rules (XTF's KN rule, entropy, excess
    loss) are rowwise; rank-based rules (keep the top k%) are not.

    Usable as a decorator: ``@rowwise def kn(s): return s.prob <= 0.95``.
    """
    if not callable(select):
        raise TypeError(f"select: expected a callable, got {type(select).__name__}")
    try:
        select.rowwise = True  # type: ignore[attr-defined]
        return select
    except AttributeError:  # e.g. a builtin or a bound method: wrap it
        def wrapped(stats: TokenStats) -> torch.Tensor:
            return select(stats)

        wrapped.rowwise = True  # type: ignore[attr-defined]
        return wrapped


def _chunk_selector(select, x, pos, kept, ref_logprobs, task_vector, acc):
    """Adapt a rowwise ``select`` to the backend's ``row_select(start, end, row_max, lse, gold, ent)``."""
    kept_rows = kept.index_select(0, pos)
    ref_rows = None if ref_logprobs is None else ref_logprobs.reshape(-1).to(acc).index_select(0, pos)
    tv = None if task_vector is None else task_vector.to(x.device, acc).unsqueeze(0)

    def row_select(s: int, e: int, row_max: torch.Tensor, lse: torch.Tensor, gold: torch.Tensor,
                   ent: torch.Tensor):
        lp = gold - lse  # both relative to row_max
        stats = TokenStats(
            logprob=lp,
            prob=lp.exp(),
            entropy=ent,
            lse=row_max + lse,
            logprob_delta=None if ref_rows is None else lp - ref_rows[s:e],
            relevance=None if tv is None else torch.nn.functional.cosine_similarity(
                x[s:e].to(acc), tv, dim=1
            ),
            keep=kept_rows[s:e].clone(),
        )
        mask = check_select_output(select(stats), (e - s,), x.device)
        return mask & kept_rows[s:e]

    return row_select


def _positions(
    labels: torch.Tensor, keep: torch.Tensor | None, ignore_index: int, shift: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat (valid, kept, src): scored label positions, kept ones, the hidden row predicting each."""
    y = labels.reshape(-1)
    flat = torch.arange(y.numel(), device=labels.device)
    valid = y != ignore_index
    if shift:
        valid &= (flat % labels.shape[-1]) != 0
        src = flat - 1
    else:
        src = flat
    kept = valid if keep is None else valid & keep.reshape(-1)
    return valid, kept, src


def _recompute_grads(be, cfg, reduction, grad_loss, divisor, h2, w, b, y_k, lse_parts_k, src_kept,
                     kept_pos, hidden_shape, need):
    """Gradients by recomputing the logits of the kept rows: returns (d_hidden, d_weight, d_bias).

    ``lse_parts_k`` = (row maximum, log-sum-exp relative to it) of the kept rows.
    """
    need_h, need_w, need_b = need
    dtype = h2.dtype
    max_k, lse_k = lse_parts_k
    acc = lse_k.dtype
    if reduction == "none":
        row_scale = grad_loss.reshape(-1).to(acc).index_select(0, kept_pos)
    else:
        g = grad_loss.to(acc)
        if divisor is not None:
            g = g / divisor
        row_scale = g.expand(kept_pos.numel()).contiguous()
    x = h2.index_select(0, src_kept)
    go = be.backward(x, w, b, y_k, max_k, lse_k, row_scale, cfg)
    dh = _scatter_rows(go.dx.to(dtype), src_kept, hidden_shape) if need_h else None
    dW = go.dw.to(dtype) if need_w else None
    dB = go.db.to(dtype) if (need_b and go.db is not None) else None
    return dh, dW, dB


def _scatter_rows(rows: torch.Tensor, src: torch.Tensor, hidden_shape: tuple[int, ...]) -> torch.Tensor:
    """d_hidden: each kept row's gradient added at the hidden row that predicted it."""
    dh = rows.new_zeros((math.prod(hidden_shape[:-1]), hidden_shape[-1]))
    dh.index_add_(0, src, rows)
    return dh.view(hidden_shape)


def masked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    ref_logprobs: torch.Tensor | None = None,
    task_vector: torch.Tensor | None = None,
    select: SelectFn | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` over kept tokens, never materialising logits.

    Args:
        hidden: ``[..., D]`` float32 / bfloat16 / float16 final hidden states (``D >= 1``).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        labels: ``[...]`` integer target ids (``hidden``'s leading shape), any integer dtype
            (converted to int64 once).
        bias: optional ``[V]`` LM-head bias, same dtype.
        keep: optional ``[...]`` bool; False = masked (noisy) token: no loss, no gradient,
            statistics still computed.
        ignore_index: labels equal to it are ignored (prompt / padding): no loss, NaN stats.
        reduction: ``"mean"`` (sum over kept tokens / ``num_items``), ``"sum"`` or
            ``"none"`` (per-token fp32 loss with the labels' shape, 0 where not kept).
        num_items: divisor for ``"mean"`` (e.g. the global kept-token count under gradient
            accumulation / data parallelism): a whole number (int, float or 0-d tensor), or
            under torch.distributed a whole count divided by the world size (what
            ``integrations.distributed.global_num_items`` returns for gradient-averaging DDP /
            FSDP); default: the number of kept tokens here. A batch with no kept token gives
            0.0 with zero gradients.
        label_smoothing: in ``[0, 1)``, as in ``F.cross_entropy``.
        z_loss: adds ``z_loss * lse**2`` per kept token.
        softcap: logits -> ``softcap * tanh(logits / softcap)`` (Gemma 2 style).
        shift: causal-LM shift inside: label position ``t`` is predicted from
            ``hidden[..., t-1, :]``; position 0 of each sequence is ignored. ``keep``,
            ``ref_logprobs`` and all statistics are aligned with label positions.
        ref_logprobs: ``[...]`` a reference model's gold-token log-probs -> ``logprob_delta``.
        task_vector: ``[D]`` -> ``relevance`` = cosine(hidden row, task_vector).
        select: ``callable(TokenStats) -> bool [...]`` called once inside the forward with
            the statistics of every non-ignored token; its mask is AND-ed with ``keep``.
        return_stats: also return a :class:`TokenStats`.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"native"``.
        position_ids: optional ``[...]`` integers (labels' shape) of packed rows, restarting
            at 0 for every document; needs ``shift=True``. A label at a document start is not
            predicted from the previous document's last hidden state: it is ignored (no loss,
            NaN statistics, not counted), as when each document runs alone.

    Returns:
        ``loss`` (0-d fp32, or ``[...]`` for ``"none"``), or ``(loss, TokenStats)``.

    Precision: every accumulation is fp32; statistics are kept relative to each row's logit
    maximum, so large common logit offsets cost nothing. Under ``torch.autocast`` the GEMM
    operands (``hidden``, ``weight``, ``bias``) are cast to the autocast dtype, as
    ``nn.Linear`` would, with fp32 accumulation and an fp32 epilogue; gradients come back in
    the parameters' dtype. First-order gradients only (``create_graph=True`` gives a
    gradient that refuses to be differentiated again). Details: ``docs/numerics.md``.
    """
    hidden, weight, bias = autocast_operands(hidden, weight, bias)
    validate(
        hidden, weight, labels, bias, keep, ignore_index, reduction, num_items, label_smoothing,
        z_loss, softcap, shift, ref_logprobs, task_vector, select, return_stats, backend,
    )
    if position_ids is not None:  # packed rows: document starts have no predictor
        labels = mask_unpredicted(labels, check_position_ids(position_ids, labels), ignore_index, shift)
    spec = MaskedCESpec(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        shift=shift,
        select=select,
        backend=backend,
        stats=return_stats,
    )
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.detach()
    if labels.dtype != torch.int64:  # any integer dtype, converted once for every backend
        labels = labels.long()
    if not torch.is_grad_enabled():  # scoring pass: make sure no gradient work is done
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    args = (hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, spec)
    with no_autocast(hidden.device.type):  # operands are cast already; the epilogue is fp32
        if select is None and torch.compiler.is_compiling():
            from ._compile import compiled_masked_ce

            outs = compiled_masked_ce(*args)
        else:
            outs = MaskedCE.apply(*args)
    loss = outs[0]
    if not return_stats:
        return loss
    stats = TokenStats(
        logprob=outs[1],
        prob=outs[2],
        entropy=outs[3],
        lse=outs[4],
        logprob_delta=outs[5] if ref_logprobs is not None else None,
        relevance=outs[6] if task_vector is not None else None,
        keep=outs[7],
    )
    return loss, stats
