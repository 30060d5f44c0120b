"""One call of a model patched by :func:`~xtf_kernels.integrations.apply_xtf`, phase by phase.

1. :func:`_parse_call`: take the patch's fields (keep mask, reference log-probs, per-call
   switches) and the loss arguments out of the call; positional arguments become keywords;
2. :func:`_forward_capturing_head`: the model's own forward with the LM head swapped for a
   capture of its input (an empty ``[..., 0]`` placeholder instead of the logits);
3. :func:`_align_targets`: labels, keep mask and reference log-probs aligned to the captured
   hidden states (``shift_labels``, ``logits_to_keep``), the documents of packed rows
   (:mod:`.packed`), ``num_items_in_batch`` checked;
4. :func:`_loss`: :func:`masked_ce` over the LM head as :func:`lm_head_spec` describes it
   (vocabulary-parallel on a tensor-parallel head), plus the MoE load-balancing term;
5. :func:`_pack_output`: the model's own output class with the new ``loss``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..lm_head import LMHeadSpec, lm_head_spec
from ..loss.api import masked_ce
from ..loss.validate import check_num_items
from ..loss.vocab_parallel import is_dtensor
from ..stats import TokenStats
from ._patch_state import MASK_LIKE, XTFPatch
from .distributed import count_kept_tokens
from .packed import batch_position_ids


def linear_head_spec(model: nn.Module) -> LMHeadSpec:
    """:func:`lm_head_spec` of a model whose LM head is an ``nn.Linear`` (TypeError otherwise)."""
    try:
        spec = lm_head_spec(model)
    except ValueError as exc:
        raise TypeError(f"{exc}; apply_xtf needs an nn.Linear LM head") from exc
    if not isinstance(spec.head, nn.Linear):
        raise TypeError(
            f"model: expected get_output_embeddings() to be an nn.Linear LM head, got "
            f"{type(spec.head).__name__} ({type(model).__name__}); apply_xtf needs a linear head"
        )
    return spec


def as_keep(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor (False = masked token), got {type(value).__name__}")
    if value.dtype == torch.bool:
        return value
    if value.dtype.is_floating_point or value.is_complex():
        raise TypeError(f"{name}: expected a bool (or 0/1 integer) tensor, got {value.dtype}")
    return value != 0


def _align(t: torch.Tensor | None, name: str, want: tuple[int, ...], slice_last: int) -> torch.Tensor | None:
    if t is None:
        return None
    if slice_last:
        t = t[..., -slice_last:]
    if tuple(t.shape) != want:
        raise ValueError(f"{name}: expected shape {want} (the labels'), got {tuple(t.shape)}")
    return t


def _check_num_items(num_items: Any, labels: torch.Tensor, keep: torch.Tensor | None, shift: bool,
                     position_ids: torch.Tensor | None = None) -> Any:
    """Zero ``num_items_in_batch``: None (loss 0) when nothing is kept here, else an error."""
    if num_items is None:
        return None
    if isinstance(num_items, torch.Tensor) and num_items.numel() == 1:
        num_items = num_items.reshape(())  # Trainers hand a [1] tensor too
    value = check_num_items(num_items, name="num_items_in_batch")
    if value is None:
        # no host sync: an async device assert, then a divisor that is never 0
        n_here = count_kept_tokens(labels, keep, shift=shift, position_ids=position_ids)
        torch._assert_async(
            (num_items > 0) | (n_here == 0),
            "num_items_in_batch is 0 but this micro-batch has kept tokens",
        )
        return num_items.clamp_min(1)
    if value == 0:
        n_here = int(count_kept_tokens(labels, keep, shift=shift, position_ids=position_ids))
        if n_here:
            raise ValueError(
                f"num_items_in_batch: got 0 but this micro-batch has {n_here} kept tokens; it must "
                "count the kept tokens of the whole step (see integrations.distributed.global_num_items)"
            )
        return None  # nothing kept: masked_ce returns 0.0 with zero gradients
    return num_items


@dataclass
class _Call:
    """The arguments of one patched call, sorted: the model's own and the loss's."""

    kwargs: dict[str, Any]
    keep: Any
    ref: Any
    response: Any
    #: the names the keep mask / reference log-probs / response mask came under (for errors)
    names: tuple[str, str, str]
    labels: Any
    shift_labels: Any
    num_items: Any
    want_logits: bool
    want_stats: bool


def _pop_field(kwargs: dict[str, Any], names: tuple[str, ...], what: str) -> tuple[str, Any]:
    """(the name it came under, the value) of one XTF field that may come under several names."""
    given = [n for n in names if kwargs.get(n) is not None]
    if len(given) > 1:
        raise ValueError(
            f"{given[0]!r} and {given[1]!r} both given: both name the {what}; pass it under one name"
        )
    values = {n: kwargs.pop(n) for n in names if n in kwargs}
    return (given[0], values[given[0]]) if given else (names[0], None)


def _parse_call(
    model: nn.Module, inner_sig: inspect.Signature, patch: XTFPatch, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Call:
    kwargs = dict(kwargs)
    keep_name, keep = _pop_field(kwargs, patch.keep_names, "keep mask")
    ref_name, ref = _pop_field(kwargs, patch.ref_names, "reference log-probs")
    resp_name, response = _pop_field(kwargs, patch.response_names, "response mask")
    want_logits = kwargs.pop("xtf_return_logits", None)
    want_stats = kwargs.pop("xtf_return_stats", None)
    if args:  # normalise positional arguments into keywords, by the original signature
        try:
            bound = inner_sig.bind_partial(*args)
        except TypeError as exc:
            raise TypeError(f"{type(model).__name__}.forward: {exc}") from exc
        for k, v in bound.arguments.items():
            if k in kwargs:
                raise TypeError(f"{type(model).__name__}.forward: got multiple values for {k!r}")
            kwargs[k] = v
    return _Call(
        kwargs=kwargs,
        keep=keep,
        ref=ref,
        response=response,
        names=(keep_name, ref_name, resp_name),
        labels=kwargs.pop("labels", None),
        shift_labels=kwargs.pop("shift_labels", None),
        num_items=kwargs.pop("num_items_in_batch", None),
        want_logits=patch.return_logits if want_logits is None else bool(want_logits),
        want_stats=patch.return_stats if want_stats is None else bool(want_stats),
    )


def _refuse_unknown(model: nn.Module, patch: XTFPatch, kwargs: dict[str, Any]) -> None:
    """TypeError for keywords the model's forward would ignore silently (see :func:`apply_xtf`)."""
    given = [k for k, v in kwargs.items() if v is not None]  # a None drops nothing
    if patch.accepted is not None:
        unknown = sorted(k for k in given if k not in patch.accepted)
    else:  # untyped **kwargs: only names that look like a mask are surely a mistake
        unknown = sorted(k for k in given if k not in patch.explicit and MASK_LIKE.search(k))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise TypeError(
            f"{type(model).__name__}.forward (patched by apply_xtf): unexpected keyword argument(s) "
            f"{names}; the model would ignore them silently. The keep mask goes in "
            f"{' / '.join(map(repr, patch.keep_names))}, reference log-probs in "
            f"{' / '.join(map(repr, patch.ref_names))}"
        )


def _forward_capturing_head(
    model: nn.Module, head: nn.Module, inner_forward: Callable[..., Any], kwargs: dict[str, Any], want_logits: bool
) -> tuple[Any, torch.Tensor]:
    """(the model's output, the hidden states its LM head received): logits only if wanted."""
    captured: list[torch.Tensor] = []
    had_own = "forward" in head.__dict__
    own = head.__dict__.get("forward")
    head_forward = head.forward

    def capture(hidden: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        captured.append(hidden)
        if want_logits:
            return head_forward(hidden, *a, **k)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    head.forward = capture
    try:
        out = inner_forward(**kwargs, return_dict=True)
    finally:
        if had_own:
            head.forward = own
        else:
            del head.forward
    if len(captured) != 1:
        raise RuntimeError(
            f"apply_xtf: expected {type(model).__name__}.forward to call its LM head "
            f"(get_output_embeddings()) exactly once, it called it {len(captured)} times; this "
            "model is not supported"
        )
    return out, captured[0]


def _align_targets(call: _Call, patch: XTFPatch, hidden: torch.Tensor) -> tuple[Any, ...]:
    """(labels, keep, ref, shift, num_items, position_ids) on the positions whose logits the model computes."""
    lead = tuple(hidden.shape[:-1])
    shift = call.shift_labels is None
    y = call.labels if shift else call.shift_labels
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"labels: expected a LongTensor, got {type(y).__name__}")
    slice_last = 0
    if tuple(y.shape) != lead:
        ltk = call.kwargs.get("logits_to_keep", 0)
        if (
            isinstance(ltk, int)
            and ltk > 0
            and y.dim() == len(lead)
            and tuple(y.shape[:-1]) == lead[:-1]
            and y.shape[-1] > lead[-1] == ltk
        ):
            slice_last = ltk
            y = y[..., -ltk:]
        else:
            raise ValueError(
                f"labels: expected shape {lead} (the positions whose logits the model computes), "
                f"got {tuple(y.shape)}"
            )
    y = y.to(hidden.device)
    keep, ref = call.keep, call.ref
    keep_name, ref_name, resp_name = call.names
    if keep is not None:
        keep = _align(as_keep(keep, keep_name), keep_name, tuple(y.shape), slice_last)
        keep = keep.to(hidden.device)
    if ref is not None:
        if not isinstance(ref, torch.Tensor) or not ref.dtype.is_floating_point:
            raise TypeError(f"{ref_name}: expected a float tensor of reference log-probs")
        ref = _align(ref, ref_name, tuple(y.shape), slice_last).to(hidden.device)
    if call.response is not None:  # checked like the keep mask; the loss does not use it
        _align(as_keep(call.response, resp_name), resp_name, tuple(y.shape), slice_last)
    pos = batch_position_ids(call.kwargs, y) if shift else None  # packed rows: their documents
    return y, keep, ref, shift, _check_num_items(call.num_items, y, keep, shift, pos), pos


def _loss(
    spec: LMHeadSpec, hidden: torch.Tensor, out: Any, patch: XTFPatch, targets: tuple[Any, ...], want_stats: bool
) -> tuple[torch.Tensor, TokenStats | None]:
    """The loss (and statistics when wanted or a policy needs them) from the captured hidden states."""
    y, keep, ref, shift, num_items, pos = targets
    # a tensor-parallel head (parallelize_module with ColwiseParallel): its input arrives as a
    # replicated DTensor and its weight is sharded over the vocabulary: masked_ce runs
    # vocabulary-parallel on the shards (no gathered weight, no logits); FSDP2's sharded
    # parameters (plain hidden states) are gathered
    tp = is_dtensor(hidden) and is_dtensor(spec.weight)
    h, weight, bias = spec.operands(hidden, gather=not tp)
    need_stats = want_stats or patch.select is not None
    res = masked_ce(
        h,
        weight,
        y,
        bias=bias,
        keep=keep,
        ignore_index=-100,
        reduction="mean",
        num_items=num_items,
        softcap=spec.softcap,
        shift=shift,
        ref_logprobs=ref,
        select=patch.select,
        return_stats=need_stats,
        position_ids=pos,
        **patch.loss_options,
    )
    loss, stats = res if need_stats else (res, None)
    aux = getattr(out, "aux_loss", None)
    coef = getattr(spec.text_config, "router_aux_loss_coef", None)
    if isinstance(aux, torch.Tensor) and coef is not None:  # MoE load balancing, as the models add it
        loss = loss + float(coef) * aux.to(loss.device)
    return loss, stats


def _pack_output(
    out: Any, loss: torch.Tensor, stats: TokenStats | None, want_logits: bool, want_stats: bool, return_dict: Any
) -> Any:
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    if want_logits:
        fields["logits"] = out["logits"]
    result = type(out)(loss=loss, **fields)
    if want_stats:
        # an extra key (after the model's own fields): survives the output re-packing that
        # mixed-precision wrappers (accelerate's convert_outputs_to_fp32) do
        result["xtf_stats"] = stats
    else:
        object.__setattr__(result, "xtf_stats", None)
    if return_dict is False:
        return result.to_tuple()
    return result


def patched_call(
    model: nn.Module,
    inner_forward: Callable[..., Any],
    inner_sig: inspect.Signature,
    patch: XTFPatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The patched forward: the model's forward, then the loss by :func:`masked_ce`."""
    call = _parse_call(model, inner_sig, patch, args, kwargs)
    if call.labels is None and call.shift_labels is None:
        given = [n for n, v in zip(call.names, (call.keep, call.ref, call.response)) if v is not None]
        if given:
            raise ValueError(
                f"{'/'.join(given)} given without labels: the keep mask only applies "
                "to a loss; pass labels too"
            )
        return inner_forward(**call.kwargs)
    _refuse_unknown(model, patch, call.kwargs)
    head = linear_head_spec(model).head
    return_dict = call.kwargs.pop("return_dict", None)
    out, hidden = _forward_capturing_head(model, head, inner_forward, call.kwargs, call.want_logits)
    spec = lm_head_spec(model)  # after the forward, as the head reads them (FSDP2 swaps its parameters)
    targets = _align_targets(call, patch, hidden)
    loss, stats = _loss(spec, hidden, out, patch, targets, call.want_stats)
    return _pack_output(out, loss, stats, call.want_logits, call.want_stats, return_dict)
