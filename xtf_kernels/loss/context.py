"""How masked_ce (:class:`~xtf_kernels.MaskedCE` and the custom ops) sits in autograd and autocast.

* Under ``torch.autocast`` the GEMM operands are cast to the autocast dtype, as ``nn.Linear``
  casts them, and the fused computation runs with autocast off (fp32 accumulation and
  epilogue): :func:`autocast_operands`, :func:`no_autocast`.
* The backward is computed by fused kernels and is not itself differentiable: under
  ``create_graph=True`` the gradients it returns refuse a second differentiation with
  :data:`SECOND_ORDER_MESSAGE` (:func:`first_order_only`).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")

SECOND_ORDER_MESSAGE = (
    "masked_ce: second-order gradients are not supported: its backward is computed by fused "
    "kernels and is not itself differentiable (create_graph=True gives a first-order gradient "
    "that cannot be differentiated again). For a gradient penalty or a Hessian-vector product "
    "through the loss, use an unfused F.linear + F.cross_entropy for that term"
)


def no_autocast(device_type: str):
    """A context with autocast off for ``device_type`` (no-op where autocast does not exist)."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def first_order_only(backward):
    """``torch.autograd.function.once_differentiable`` for :class:`MaskedCE`, with a message that
    names masked_ce, and refusing also when only the inputs (not the incoming gradients)
    require grad: under ``create_graph=True`` every gradient it returns carries a node that
    raises :data:`SECOND_ORDER_MESSAGE` when something differentiates through it."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad(), no_autocast(ctx.device_type):
            outs = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # the usual backward, no create_graph
            return outs
        err = torch._C._functions.DelayedError(SECOND_ORDER_MESSAGE, len(outs))
        fake = [o.detach().requires_grad_() if isinstance(o, torch.Tensor) else o for o in outs]
        return err(*fake)

    return wrapper


def autocast_operands(hidden, weight, bias):
    """Under ``torch.autocast``: the GEMM operands in the autocast dtype, as ``nn.Linear`` casts
    them (fp32 / fp16 / bf16 tensors; float64 stays). Otherwise (or for arguments that are not
    tensors, which validation then reports) they are returned unchanged."""
    if not isinstance(hidden, torch.Tensor) or hidden.device.type not in _AUTOCAST_DEVICES:
        return hidden, weight, bias
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        ok = isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return t.to(dt) if ok else t

    return cast(hidden), cast(weight), cast(bias)
