"""masked_ce as ``torch.library`` custom ops, so a ``torch.compile``d training step has no graph break.

Under ``torch.compile`` (and ``select is None``) :func:`xtf_kernels.masked_ce` dispatches here:
``xtf_kernels::masked_ce_fwd`` runs :func:`.forward.run_forward` as one opaque node (no
gradient work), and its registered autograd formula calls ``xtf_kernels::masked_ce_bwd``,
which recomputes the logits of the kept rows (:func:`.core.recompute_grads`, the four-GEMM
path). ``Options.grad_in_forward`` does not apply here, by design: the row compaction is
data-dependent, so it happens inside the ops and every output has a static shape (the fake
implementations are exact). The options are resolved once, in the front end, and travel as op
arguments (``chunk_elems``, ``check_labels``): the backward never reads the global options.
A ``select`` callable cannot live inside a graph: with one, Dynamo breaks the graph at the
``MaskedCE`` call. Second-order gradients are refused with the eager path's message.

The ops' option arguments are not written here: they are the :class:`~.spec.MaskedCESpec`
fields named by :data:`~.spec.OP_FIELDS` / :data:`~.spec.BWD_OP_FIELDS`, typed as the spec
types them (:func:`_with_options`), and every glue function below reads them back by name. A
new option is a spec field listed there, and nothing here.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable

import torch

from ..backends import resolve_backend
from .context import SECOND_ORDER_MESSAGE
from .core import Need, RecomputeGrad, mean_divisor, recompute_grads, source_rows
from .forward import run_forward
from .spec import BWD_OP_FIELDS, OP_FIELDS, MaskedCEOutputs, MaskedCESpec

_Outs = tuple[(torch.Tensor,) * len(MaskedCEOutputs._fields)]  # the forward op's outputs


def _with_options(fields: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorator: the signature of ``fn(<tensor parameters>, *options)`` becomes the tensor
    parameters followed by the :class:`MaskedCESpec` fields ``fields``, each annotated with the
    spec's type, so that ``torch.library.custom_op`` infers the op's schema from the spec.
    ``fn`` still gets the options positionally, in that order (see :func:`_spec`)."""
    types = typing.get_type_hints(MaskedCESpec)
    defaults = {f.name: f.default for f in dataclasses.fields(MaskedCESpec)}

    def annotate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        tensors = [p for p in sig.parameters.values() if p.kind is not p.VAR_POSITIONAL]
        options = [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types[f],
                                     default=defaults[f]) for f in fields]
        fn.__signature__ = sig.replace(parameters=tensors + options)
        return fn

    return annotate


def _spec(fields: tuple[str, ...], options: tuple, **extra) -> MaskedCESpec:
    """The spec of an op call: its ``options`` (the values of ``fields``) and ``extra``."""
    if len(options) > len(fields):
        raise TypeError(f"expected at most {len(fields)} options, got {len(options)}")
    return MaskedCESpec(**dict(zip(fields, options)), **extra)  # missing trailing ones: defaults


@_with_options(OP_FIELDS)
def _fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
         keep: torch.Tensor | None, ref_logprobs: torch.Tensor | None, task_vector: torch.Tensor | None,
         num_items: torch.Tensor | None, *options) -> _Outs:
    spec = _spec(OP_FIELDS, options, grad_in_forward=False)
    with torch.no_grad():
        res = run_forward(
            hidden=hidden, weight=weight, labels=labels, bias=bias, keep=keep, ref_logprobs=ref_logprobs,
            task_vector=task_vector, num_items=num_items, spec=spec,
            need=Need(hidden=False, weight=False, bias=False),
        )
    return tuple(o.clone() for o in res.outputs)


masked_ce_fwd = torch.library.custom_op("xtf_kernels::masked_ce_fwd", _fwd, mutates_args=())
#: the forward op's arguments by name, in its schema's order
_FWD_ARGS = tuple(inspect.signature(_fwd).parameters)
#: the defaults of its trailing option arguments (a call may leave them out)
_FWD_DEFAULTS = {k: p.default for k, p in inspect.signature(_fwd).parameters.items()
                 if p.default is not inspect.Parameter.empty}


@masked_ce_fwd.register_fake
def _(hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, *options):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lead = labels.shape

    def stat():
        return hidden.new_empty(lead, dtype=acc)

    return tuple(MaskedCEOutputs(
        loss=hidden.new_empty(lead if _spec(OP_FIELDS, options).reduction == "none" else (), dtype=acc),
        logprob=stat(), prob=stat(), entropy=stat(), lse=stat(),
        logprob_delta=stat() if ref_logprobs is not None else hidden.new_empty((0,), dtype=acc),
        relevance=stat() if task_vector is not None else hidden.new_empty((0,), dtype=acc),
        keep=labels.new_empty(lead, dtype=torch.bool),
        lse_parts=hidden.new_empty((2, *lead), dtype=acc),
    ))


@_with_options(BWD_OP_FIELDS)
def _bwd(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
         bias: torch.Tensor | None, kept: torch.Tensor, lse_parts: torch.Tensor,
         num_items: torch.Tensor | None, *options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(BWD_OP_FIELDS, options)
    kept_pos = kept.reshape(-1).nonzero().squeeze(1)
    divisor = None
    if spec.reduction == "mean":
        divisor = mean_divisor(num_items, n_kept=kept_pos.numel(), dtype=lse_parts.dtype,
                               device=lse_parts.device)
    parts_k = lse_parts.reshape(2, -1).index_select(1, kept_pos)
    g = RecomputeGrad(
        src_kept=source_rows(labels, shift=spec.shift).index_select(0, kept_pos),
        hidden_rows=hidden.reshape(-1, hidden.shape[-1]), weight=weight.contiguous(), bias=bias,
        labels_kept=labels.reshape(-1).index_select(0, kept_pos), row_max_kept=parts_k[0],
        lse_kept=parts_k[1], kept_pos=kept_pos, divisor=divisor,
    )
    dh, dw, db = recompute_grads(
        g, backend=resolve_backend(spec.backend, hidden.device, hidden.dtype), cfg=spec.ce_config(),
        reduction=spec.reduction, grad_loss=grad_loss, hidden_shape=tuple(hidden.shape),
        need=Need(hidden=True, weight=True, bias=bias is not None),
    )
    return dh, dw, db if db is not None else weight.new_empty((0,))


masked_ce_bwd = torch.library.custom_op("xtf_kernels::masked_ce_bwd", _bwd, mutates_args=())

@masked_ce_bwd.register_fake
def _(grad_loss, hidden, weight, labels, bias, *_rest):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    args = {**_FWD_DEFAULTS, **dict(zip(_FWD_ARGS, inputs))}
    out = MaskedCEOutputs(*output)
    ctx.save_for_backward(args["hidden"], args["weight"], args["labels"], args["bias"], out.keep,
                          out.lse_parts, args["num_items"])
    ctx.options = {k: args[k] for k in BWD_OP_FIELDS}


def _backward(ctx, grad_loss, *_unused):
    hidden, weight, labels, bias, kept, lse_parts, num_items = ctx.saved_tensors
    dh, dw, db = masked_ce_bwd(grad_loss, hidden, weight, labels, bias, kept, lse_parts, num_items,
                               **ctx.options)
    grads = {"hidden": dh, "weight": dw, "bias": db if bias is not None else None}
    return tuple(grads.get(name) for name in _FWD_ARGS)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(SECOND_ORDER_MESSAGE)


masked_ce_fwd.register_autograd(_backward, setup_context=_setup_context)
masked_ce_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def compiled_masked_ce(
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
) -> MaskedCEOutputs:
    """The custom-op path of masked_ce (same outputs as ``MaskedCE.apply``; ``spec`` resolved,
    ``select`` None)."""
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(float(num_items), device=hidden.device)
    outs = masked_ce_fwd(
        hidden, weight, labels, bias, keep, ref_logprobs, task_vector, num_items, **spec.op_args()
    )
    return MaskedCEOutputs(*outs)
