"""The entry point :func:`masked_ce`: autocast, validation, the call's spec, then the autograd
Function (eager) or the custom op (inside ``torch.compile``)."""

from __future__ import annotations

import dataclasses

import torch

from ..backends.driver import acc_dtype
from ..documents import check_position_ids, mask_unpredicted
from ..grad_filter import GradFilter, as_grad_filter
from ..stats import TokenStats
from .autograd import MaskedCE
from .context import autocast_operands, no_autocast
from .custom_op import compiled_masked_ce
from .spec import MaskedCEOutputs, MaskedCESpec, SelectFn
from .validate import validate
from .vocab_parallel import VocabParallel, is_dtensor, unwrap_dtensors


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
    grad_filter: None | str | float | GradFilter = None,
    vocab_parallel: VocabParallel | None = None,
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
            accumulation / data parallelism): a whole number, as an int or a 0-d tensor
            (integer dtype, or a float holding a whole number); default: the number of kept
            tokens here. A batch with no kept token gives 0.0 with zero gradients.
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
        grad_filter: skip negligible vocabulary columns in the dX / dW GEMMs of the backward
            (the loss and every statistic stay exact): None (exact; default from
            :func:`~xtf_kernels.options`), ``"auto"`` (``|d loss / d logit| < eps(dtype) / 32``,
            cut-cross-entropy's rule), a float threshold, or a :class:`~xtf_kernels.GradFilter`
            (e.g. with a bound on the mass skipped per row). ``return_stats`` reports the skipped
            mass per token (``TokenStats.grad_skipped``). See :mod:`xtf_kernels.grad_filter`.
        vocab_parallel: a :class:`VocabParallel` when ``weight`` (and ``bias``) are this rank's
            rows ``[start, stop)`` of an LM head split over the vocabulary across a process
            group whose ranks all pass the same hidden states and labels. The loss, every
            statistic and ``select`` are those of the whole head (two all-reduces of per-row
            statistics in the forward); the gradient is recomputed in the backward on the
            local rows (``Options.grad_in_forward`` does not apply), ``d_weight`` / ``d_bias``
            are the local rows' and ``d_hidden`` is all-reduced over the group. A
            ``torch.distributed.tensor.DTensor`` weight sharded on dim 0 of a 1-D mesh
            (``Shard(0)``, e.g. a ``ColwiseParallel`` LM head) does the same by itself,
            with its mesh's group (leave ``vocab_parallel`` None then). Under
            ``torch.compile`` this call runs eagerly (a graph break). See
            ``docs/training.md``, "Tensor-parallel LM head".

    Returns:
        ``loss`` (0-d fp32, or ``[...]`` for ``"none"``), or ``(loss, TokenStats)``.

    Precision: every accumulation is fp32; statistics are kept relative to each row's logit
    maximum, so large common logit offsets cost nothing. Under ``torch.autocast`` the GEMM
    operands (``hidden``, ``weight``, ``bias``) are cast to the autocast dtype, as
    ``nn.Linear`` would, with fp32 accumulation and an fp32 epilogue; gradients come back in
    the parameters' dtype. First-order gradients only (``create_graph=True`` gives a
    gradient that refuses to be differentiated again). Details: ``docs/numerics.md``.
    """
    kw = dict(bias=bias, keep=keep, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, shift=shift,
              ref_logprobs=ref_logprobs, task_vector=task_vector, select=select,
              return_stats=return_stats, backend=backend, position_ids=position_ids,
              grad_filter=grad_filter)
    if vocab_parallel is None and not is_dtensor(weight):
        return _masked_ce(hidden, weight, labels, shard=None, **kw)
    return _vocab_parallel_masked_ce(hidden, weight, labels, vocab_parallel, kw)


@torch.compiler.disable
def _vocab_parallel_masked_ce(hidden, weight, labels, vocab_parallel, kw):
    """:func:`masked_ce` on a vocabulary shard (eager: collectives and DTensors in one graph
    break under ``torch.compile``)."""
    hidden, weight, bias, shard = unwrap_dtensors(hidden, weight, kw.pop("bias"), vocab_parallel)
    return _masked_ce(hidden, weight, labels, shard=shard, bias=bias, **kw)


def _masked_ce(hidden, weight, labels, *, shard, bias, keep, ignore_index, reduction, num_items,
               label_smoothing, z_loss, softcap, shift, ref_logprobs, task_vector, select, return_stats,
               backend, position_ids, grad_filter):
    """:func:`masked_ce` on plain tensors; ``shard``: the vocabulary layout or None."""
    hidden, weight, bias = autocast_operands(hidden, weight, bias)
    validate(
        hidden=hidden, weight=weight, labels=labels, bias=bias, keep=keep, ignore_index=ignore_index,
        reduction=reduction, num_items=num_items, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, shift=shift, ref_logprobs=ref_logprobs, task_vector=task_vector,
        select=select, return_stats=return_stats, backend=backend, empty_vocab=shard is not None,
    )
    as_grad_filter(grad_filter)  # the error names the argument
    if position_ids is not None:  # packed rows: document starts have no predictor
        labels = mask_unpredicted(labels, check_position_ids(position_ids, labels), ignore_index, shift)
    spec = MaskedCESpec(  # options read once per call: the backward reads the spec, never them
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        shift=shift,
        select=select,
        backend=backend,
        stats=return_stats,
        grad_filter=grad_filter,
        vocab_shard=shard,
    ).resolved().with_grad_filter(hidden.dtype)
    report = None
    if return_stats and spec.grad_filter_threshold is not None and not torch.compiler.is_compiling():
        report = torch.full(labels.shape, float("nan"), dtype=acc_dtype(hidden.dtype), device=hidden.device)
        spec = dataclasses.replace(spec, grad_skipped_out=report)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.detach()
    if labels.dtype != torch.int64:  # any integer dtype, converted once for every backend
        labels = labels.long()
    if not torch.is_grad_enabled():  # scoring pass: make sure no gradient work is done
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    tensors = dict(hidden=hidden, weight=weight, labels=labels, bias=bias, keep=keep,
                   ref_logprobs=ref_logprobs, task_vector=task_vector, num_items=num_items)
    with no_autocast(hidden.device.type):  # operands are cast already; the epilogue is fp32
        if select is None and shard is None and torch.compiler.is_compiling():
            outs = compiled_masked_ce(**tensors, spec=spec)
        else:
            outs = MaskedCEOutputs(*MaskedCE.apply(*tensors.values(), spec))
    if not return_stats:
        return outs.loss
    return outs.loss, outs.token_stats(has_delta=ref_logprobs is not None,
                                       has_relevance=task_vector is not None, grad_skipped=report)
