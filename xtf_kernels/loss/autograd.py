""":class:`MaskedCE`, the ``torch.autograd.Function`` of masked_ce: a thin layer over
:func:`.forward.run_forward` and the gradient functions of :mod:`.core`."""

from __future__ import annotations

import torch

from .context import first_order_only
from .core import Need, formed_grads, recompute_grads, zero_grads
from .forward import FormedGrad, RecomputeGrad, ZeroGrad, run_forward
from .spec import MaskedCESpec

_RETAIN_GRAPH_MESSAGE = (
    "masked_ce: backward through the same graph a second time (retain_graph=True) is not "
    "supported on the gradient-in-forward path, whose weight gradient is handed out in place; "
    "run the forward under xtf_kernels.options(grad_in_forward=False) for that"
)


class MaskedCE(torch.autograd.Function):
    """``torch.autograd.Function`` for the fused masked CE.

    ``MaskedCE.apply(hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items,
    spec)`` returns ``(loss, logprob, prob, entropy, lse, logprob_delta, relevance, keep,
    lse_parts)`` (the fields of :class:`~xtf_kernels.loss.MaskedCEOutputs`, which
    ``MaskedCEOutputs(*outs)`` names) where the statistics are detached fp32 tensors with the
    labels' shape; ``logprob_delta`` and ``relevance`` are empty tensors when
    ``ref_logprobs`` / ``task_vector`` are None; ``lse_parts`` ``[2, *labels.shape]`` holds
    each row's logit maximum and its log-sum-exp relative to it. Inputs are not validated
    here (labels must be int64): :func:`masked_ce` is the validated entry point. The options
    fields of ``spec`` left None are read from :func:`~xtf_kernels.get_options` once, here.
    Second-order gradients are refused (see :data:`.context.SECOND_ORDER_MESSAGE`).
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
        need = Need(hidden=ctx.needs_input_grad[0], weight=ctx.needs_input_grad[1],
                    bias=ctx.needs_input_grad[3])
        res = run_forward(
            hidden=hidden, weight=weight, labels=labels, bias=bias, keep=keep,
            ref_logprobs=ref_logprobs, task_vector=task_vector, num_items=num_items,
            spec=spec.resolved().with_grad_filter(hidden.dtype), need=need,
        )
        ctx.device_type = hidden.device.type
        ctx.hidden_shape = tuple(hidden.shape)
        ctx.need = need
        ctx.plan = type(res.grad)
        g = res.grad
        if isinstance(g, ZeroGrad):
            ctx.zero = g
        elif isinstance(g, FormedGrad):
            ctx.save_for_backward(g.src_kept, g.dx, g.divisor)
            # held as attributes, not saved tensors: the backward scales them in place
            ctx.dw, ctx.db = g.dw, g.db
        elif isinstance(g, RecomputeGrad):
            ctx.save_for_backward(*g)
            ctx.backend, ctx.cfg, ctx.reduction = res.backend, res.cfg, spec.reduction
            ctx.shard = spec.vocab_shard
            # the filter's report is known once the backward has run: it fills this output
            ctx.grad_skipped = spec.grad_skipped_out
        outs = tuple(res.outputs)
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        if ctx.plan is ZeroGrad:  # nothing kept: zero gradients, no kernel launched
            z = ctx.zero
            dh, dw, db = zero_grads(hidden_shape=ctx.hidden_shape, hidden_rows=z.hidden_rows,
                                    weight=z.weight, bias=z.bias, need=ctx.need)
        elif ctx.plan is FormedGrad:
            src_kept, dx, divisor = ctx.saved_tensors
            if ctx.dw is None:
                raise RuntimeError(_RETAIN_GRAPH_MESSAGE)
            d_w, d_b = ctx.dw, ctx.db
            ctx.dw = ctx.db = None  # handed out below: scaled in place, no second [V, D] buffer
            dh, dw, db = formed_grads(grad_loss=grad_loss, divisor=divisor, dx=dx, dw=d_w, db=d_b,
                                      src_kept=src_kept, hidden_shape=ctx.hidden_shape, need=ctx.need)
        else:
            dh, dw, db = recompute_grads(RecomputeGrad(*ctx.saved_tensors), backend=ctx.backend,
                                         cfg=ctx.cfg, reduction=ctx.reduction, grad_loss=grad_loss,
                                         hidden_shape=ctx.hidden_shape, need=ctx.need,
                                         skipped_out=ctx.grad_skipped, shard=ctx.shard)
        return dh, dw, None, db, None, None, None, None, None
