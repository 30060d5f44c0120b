"""masked_ce as ``torch.library`` custom ops, so a ``torch.compile``d training step has no graph break.

Under ``torch.compile`` (and ``select is None``) :func:`xtf_kernels.masked_ce` dispatches here:
``xtf_kernels::masked_ce_fwd`` runs the eager kernels as one opaque node, and its registered
autograd formula calls ``xtf_kernels::masked_ce_bwd``, which recomputes the logits of the kept
rows (the four-GEMM path: the data-dependent row compaction happens inside the op, so every
output has a static shape and the fake implementations are exact). A ``select`` callable
cannot live inside a graph: with one, Dynamo breaks the graph at the ``MaskedCE`` call.
Second-order gradients are refused with the same message as the eager path.
"""

import torch

from .backends import CEConfig, resolve_backend
from .config import get_options

_Outs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
              torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("xtf_kernels::masked_ce_fwd", mutates_args=())
def masked_ce_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    task_vector: torch.Tensor | None,
    num_items: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    shift: bool,
    backend: str,
) -> _Outs:
    from .ops import MaskedCE, MaskedCESpec

    spec = MaskedCESpec(ignore_index, reduction, label_smoothing, z_loss, softcap, shift, None, backend)
    with torch.no_grad():
        outs = MaskedCE.apply(
            hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, spec
        )
    return tuple(o.clone() for o in outs)


@masked_ce_fwd.register_fake
def _(hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, ignore_index,
      reduction, label_smoothing, z_loss, softcap, shift, backend):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lead = labels.shape
    stat = lambda: hidden.new_empty(lead, dtype=acc)
    loss = hidden.new_empty(lead if reduction == "none" else (), dtype=acc)
    delta = stat() if ref_logprobs is not None else hidden.new_empty((0,), dtype=acc)
    rel = stat() if task_vector is not None else hidden.new_empty((0,), dtype=acc)
    parts = hidden.new_empty((2, *lead), dtype=acc)
    return (loss, stat(), stat(), stat(), stat(), delta, rel, labels.new_empty(lead, dtype=torch.bool),
            parts)


@torch.library.custom_op("xtf_kernels::masked_ce_bwd", mutates_args=())
def masked_ce_bwd(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    lse_parts: torch.Tensor,
    num_items: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    shift: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .ops import _positions, _recompute_grads

    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D)
    _, _, src = _positions(labels, None, -1, shift)
    kept_pos = kept.reshape(-1).nonzero().squeeze(1)
    be = resolve_backend(backend, hidden.device, hidden.dtype)
    cfg = CEConfig(softcap, label_smoothing, z_loss, get_options().chunk_elems)
    divisor = None
    if reduction == "mean":
        divisor = num_items if num_items is not None else torch.as_tensor(
            max(kept_pos.numel(), 1), dtype=lse_parts.dtype, device=lse_parts.device
        )
    parts_k = lse_parts.reshape(2, -1).index_select(1, kept_pos)
    dh, dw, db = _recompute_grads(
        be, cfg, reduction, grad_loss, divisor, h2, weight.contiguous(), bias,
        labels.reshape(-1).index_select(0, kept_pos), (parts_k[0], parts_k[1]),
        src.index_select(0, kept_pos), kept_pos, tuple(hidden.shape), (True, True, bias is not None),
    )
    if db is None:
        db = weight.new_empty((0,))
    return dh, dw, db


@masked_ce_bwd.register_fake
def _(grad_loss, hidden, weight, labels, bias, kept, lse_parts, num_items, reduction, label_smoothing,
      z_loss, softcap, shift, backend):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, ignore_index,
     reduction, label_smoothing, z_loss, softcap, shift, backend) = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[7], output[8], num_items)
    ctx.args = (reduction, label_smoothing, z_loss, softcap, shift, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, *_unused):
    hidden, weight, labels, bias, kept, lse_parts, num_items = ctx.saved_tensors
    dh, dw, db = masked_ce_bwd(grad_loss, hidden, weight, labels, bias, kept, lse_parts, num_items, *ctx.args)
    return (dh, dw, None, db if ctx.has_bias else None) + (None,) * 11


def _no_double_backward(ctx, *grads):
    from ._autograd import SECOND_ORDER_MESSAGE

    raise RuntimeError(SECOND_ORDER_MESSAGE)


masked_ce_fwd.register_autograd(_backward, setup_context=_setup_context)
masked_ce_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def compiled_masked_ce(hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, spec):
    """The custom-op path of masked_ce (same outputs as ``MaskedCE.apply``)."""
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(float(num_items), device=hidden.device)
    return masked_ce_fwd(
        hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, spec.ignore_index,
        spec.reduction, spec.label_smoothing, spec.z_loss, spec.softcap, spec.shift, spec.backend,
    )
