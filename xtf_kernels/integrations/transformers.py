"""Hugging Face ``transformers`` integration: compute a causal LM's loss with :func:`masked_ce`.

:func:`apply_xtf` patches one model instance (never its class) with a forward wrapper that is
the same for every ``*ForCausalLM`` whose ``get_output_embeddings()`` is an ``nn.Linear``:

1. the model's own forward runs, with ``labels=None``, while the LM head's forward is swapped
   for a capture that records the hidden states the head receives (after the model's final
   norm and any ``logits_to_keep`` slicing) and returns an empty ``[..., 0]`` placeholder, so
   no ``[tokens x vocab]`` logits are ever built;
2. the loss is then ``masked_ce(hidden, head.weight, labels, bias=head.bias, keep=...,
   shift=True, num_items=num_items_in_batch, softcap=config.final_logit_softcapping)``,
   which matches ``transformers.loss.loss_utils.ForCausalLMLoss`` (shift inside, -100 ignored,
   ``sum / num_items_in_batch`` when the Trainer passes it, mean over kept tokens otherwise).

Nothing model-specific is copied: the decoder, its kwargs, caches and outputs are the model's
own. Without labels the original forward runs untouched (generation is unaffected).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..documents import counted_mask
from ..ops import masked_ce
from ..stats import TokenStats
from .packed import batch_position_ids, mask_batch_labels

_PATCH_ATTR = "_xtf_patch"

#: per-call keyword arguments understood by the patched forward (never passed to the model)
CALL_KWARGS = ("xtf_return_logits", "xtf_return_stats")


class XTFPatch:
    """State of one :func:`apply_xtf` patch (stored on the model as ``model._xtf_patch``)."""

    def __init__(
        self,
        *,
        keep_key: str,
        ref_key: str,
        select: Callable[[TokenStats], torch.Tensor] | None,
        label_smoothing: float,
        z_loss: float,
        return_logits: bool,
        return_stats: bool,
        backend: str,
        had_prev: bool,
        prev_forward: Any,
        wrapper: Any,
    ) -> None:
        self.keep_key = keep_key
        self.ref_key = ref_key
        self.select = select
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.return_logits = return_logits
        self.return_stats = return_stats
        self.backend = backend
        #: whether the instance had its own ``forward`` before (e.g. another wrapper)
        self.had_prev = had_prev
        self.prev_forward = prev_forward
        self.wrapper = wrapper

    def inner_forward(self, model: nn.Module) -> Callable[..., Any]:
        """The forward the patch wraps, bound to ``model`` (a deepcopy rebinds correctly)."""
        if self.had_prev:
            return self.prev_forward
        return types.MethodType(type(model).forward, model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP1 / ``torch.compile`` / PEFT wrappers.

    Args:
        model: an ``nn.Module``, possibly wrapped.

    Returns:
        The innermost module that owns ``get_output_embeddings``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            inner = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, FSDP1, DataParallel
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            inner = model._orig_mod
        else:
            break
        if inner is model:
            break
        model = inner
    return model


def is_patched(model: nn.Module) -> bool:
    """True when :func:`apply_xtf` has patched ``model`` (or the model it wraps)."""
    return isinstance(unwrap_model(model).__dict__.get(_PATCH_ATTR), XTFPatch)


def get_patch(model: nn.Module) -> XTFPatch:
    """The :class:`XTFPatch` of a patched model; ValueError when it is not patched."""
    patch = unwrap_model(model).__dict__.get(_PATCH_ATTR)
    if not isinstance(patch, XTFPatch):
        raise ValueError("model: expected a model patched by apply_xtf(), got an unpatched one")
    return patch


def _linear_head(model: nn.Module) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        raise TypeError(
            f"model: expected a Hugging Face *ForCausalLM with get_output_embeddings(), got "
            f"{type(model).__name__}"
        )
    head = get()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"model: expected get_output_embeddings() to be an nn.Linear LM head, got "
            f"{type(head).__name__} ({type(model).__name__}); apply_xtf needs a linear head"
        )
    return head


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"model: expected a Hugging Face model with a .config, got {type(model).__name__}")
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _logit_scale(cfg: Any) -> float:
    """Post-head multiplier some architectures apply to the logits (1.0 for most)."""
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    return scale


def _as_keep(value: Any, name: str) -> torch.Tensor:
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
    if isinstance(num_items, bool) or not isinstance(num_items, int | float | torch.Tensor):
        raise TypeError(
            f"num_items_in_batch: expected an int or a 0-d tensor, got {type(num_items).__name__}"
        )
    if isinstance(num_items, torch.Tensor) and num_items.numel() != 1:
        raise ValueError(f"num_items_in_batch: expected a 0-d tensor, got shape {tuple(num_items.shape)}")
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.reshape(())
    valid = counted_mask(labels, keep, shift=shift, position_ids=position_ids)
    if isinstance(num_items, torch.Tensor) and num_items.device.type != "cpu":
        # no host sync: an async device assert, then a divisor that is never 0
        n_here = valid.sum()
        torch._assert_async(
            (num_items > 0) | (n_here == 0),
            "num_items_in_batch is 0 but this micro-batch has kept tokens",
        )
        return num_items.clamp_min(1)
    if float(num_items) < 0:
        raise ValueError(f"num_items_in_batch: expected >= 0, got {float(num_items)}")
    if float(num_items) == 0:
        n_here = int(valid.sum())
        if n_here:
            raise ValueError(
                f"num_items_in_batch: got 0 but this micro-batch has {n_here} kept tokens; it must "
                "count the kept tokens of the whole step (see integrations.distributed.global_num_items)"
            )
        return None  # nothing kept: masked_ce returns 0.0 with zero gradients
    return num_items


def apply_xtf(
    model: nn.Module,
    *,
    keep_key: str = "xtf_keep",
    ref_key: str = "xtf_ref_logprobs",
    select: Callable[[TokenStats], torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_logits: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Patch a Hugging Face causal LM so its loss is computed by :func:`masked_ce`.

    After the patch, ``model(input_ids, attention_mask=..., labels=labels, xtf_keep=keep)``
    returns the model's usual output class (``CausalLMOutputWithPast`` for most models) with:

    * ``loss``: fp32 0-d, ``sum(CE over kept tokens) / num_items_in_batch`` when the Trainer
      (or you) pass ``num_items_in_batch``, else the mean over kept tokens; labels equal to
      -100 are ignored and label position ``t`` is predicted from position ``t - 1``, exactly
      as ``ForCausalLMLoss``. Pre-shifted ``shift_labels`` (context parallelism) are used
      without a shift. With ``logits_to_keep=k`` (int) the loss covers the last ``k``
      positions (labels of length ``k``, or full-length labels sliced to their last ``k``).
    * ``logits``: None, unless ``apply_xtf(..., return_logits=True)`` or the call passes
      ``xtf_return_logits=True`` (then the model's usual logits, softcap included).
    * ``xtf_stats``: a :class:`TokenStats` (label-aligned) when ``return_stats=True`` or the
      call passes ``xtf_return_stats=True``, or when ``select`` is set; else None.

    Packed (padding-free) batches: ``position_ids`` (and ``cu_seq_lens_q/k``,
    ``max_length_q/k``) go to the model unchanged; the label-aligned ``position_ids`` (else
    documents from ``cu_seq_lens_q``) also go to ``masked_ce``, so a label at a document start
    is never predicted from the previous document (:mod:`xtf_kernels.documents`).

    Without ``labels`` (and ``shift_labels``) the original forward runs unchanged.

    Args:
        model: a ``*ForCausalLM`` (also accepted wrapped in PEFT / DDP / ``torch.compile``;
            the inner model is patched) whose ``get_output_embeddings()`` is an ``nn.Linear``
            (tied or not, with or without bias). Gemma 2's ``final_logit_softcapping`` and
            Cohere / Granite logit scales are read from the config.
        keep_key: name of the batch field holding the keep mask: ``[B, L]`` bool (or 0/1
            integers), label-aligned, False = masked token (no loss, no gradient).
        ref_key: name of the batch field holding reference log-probs ``[B, L]`` float
            (label-aligned), for ``TokenStats.logprob_delta`` (excess-loss policies).
        select: optional ``callable(TokenStats) -> bool [B, L]`` policy called inside the
            loss's forward (e.g. :class:`xtf_kernels.xtf.dynamic.DynamicXTF`).
        label_smoothing: as in ``masked_ce`` (the Trainer's ``label_smoothing_factor`` needs
            logits, so set it here instead).
        z_loss: as in ``masked_ce``.
        return_logits: default for ``xtf_return_logits``.
        return_stats: default for ``xtf_return_stats``.
        backend: ``masked_ce`` backend.

    Returns:
        The same ``model`` object (patched in place).

    Raises:
        TypeError: no linear LM head, or a model that is not a Hugging Face causal LM.
        ValueError: the model is already patched, or a bad option.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, val in (("keep_key", keep_key), ("ref_key", ref_key)):
        if not isinstance(val, str) or not val.isidentifier():
            raise ValueError(f"{name}: expected a Python identifier string, got {val!r}")
    if keep_key == ref_key:
        raise ValueError(f"keep_key and ref_key must differ, both are {keep_key!r}")
    if select is not None and not callable(select):
        raise TypeError(f"select: expected a callable(TokenStats) -> bool mask, got {type(select).__name__}")
    for name, val in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(val, bool) or not isinstance(val, int | float):
            raise TypeError(f"{name}: expected a float, got {type(val).__name__}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing}")
    if float(z_loss) < 0:
        raise ValueError(f"z_loss: expected >= 0, got {z_loss}")
    for name, val in (("return_logits", return_logits), ("return_stats", return_stats)):
        if not isinstance(val, bool):
            raise TypeError(f"{name}: expected a bool, got {type(val).__name__}")
    from ..backends import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")

    target = unwrap_model(model)
    if is_patched(target):
        raise ValueError(
            f"model: {type(target).__name__} is already patched by apply_xtf(); call revert(model) first"
        )
    _linear_head(target)  # fail now, not at the first training step
    _text_config(target)

    had_prev = "forward" in target.__dict__
    prev_forward = target.__dict__.get("forward")
    inner_sig = inspect.signature(target.forward)

    def xtf_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # everything is read from the instance, so copy.deepcopy(model) gets its own patch
        patch = self.__dict__.get(_PATCH_ATTR)
        if not isinstance(patch, XTFPatch):
            raise RuntimeError("apply_xtf: patched forward called on a model without its patch state")
        return _patched_call(self, patch.inner_forward(self), inner_sig, patch, args, kwargs)

    # The Trainer keeps only dataset columns named in forward's signature: add ours.
    params = [p for p in inner_sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in inner_sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    for extra in (keep_key, ref_key):
        if extra not in names:
            params.append(inspect.Parameter(extra, inspect.Parameter.KEYWORD_ONLY, default=None))
    if not var_kw:
        var_kw = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    # the function's own signature starts with self, which binding to the model drops
    self_param = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    xtf_forward.__signature__ = inner_sig.replace(  # type: ignore[attr-defined]
        parameters=self_param + params + var_kw
    )
    xtf_forward.__doc__ = (
        f"{type(target).__name__}.forward patched by xtf_kernels apply_xtf (keep_key={keep_key!r})."
    )
    bound = types.MethodType(xtf_forward, target)
    patch = XTFPatch(
        keep_key=keep_key,
        ref_key=ref_key,
        select=select,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        return_logits=return_logits,
        return_stats=return_stats,
        backend=backend,
        had_prev=had_prev,
        prev_forward=prev_forward,
        wrapper=bound,
    )
    target.forward = bound
    target.__dict__[_PATCH_ATTR] = patch
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_xtf`: restore the forward the model had before the patch.

    Args:
        model: a model patched by :func:`apply_xtf` (or a wrapper around it).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: the model is not patched.
        RuntimeError: something replaced ``model.forward`` after the patch (revert that first).
    """
    target = unwrap_model(model)
    patch = get_patch(target)
    if target.__dict__.get("forward") is not patch.wrapper:
        raise RuntimeError(
            "model.forward was replaced after apply_xtf(); undo that wrapper before revert()"
        )
    if not patch.had_prev:
        del target.forward
    else:
        target.forward = patch.prev_forward
    del target.__dict__[_PATCH_ATTR]
    return model


def _patched_call(
    model: nn.Module,
    inner_forward: Callable[..., Any],
    inner_sig: inspect.Signature,
    patch: XTFPatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    kwargs = dict(kwargs)
    keep = kwargs.pop(patch.keep_key, None)
    ref = kwargs.pop(patch.ref_key, None)
    want_logits = kwargs.pop("xtf_return_logits", None)
    want_stats = kwargs.pop("xtf_return_stats", None)
    want_logits = patch.return_logits if want_logits is None else bool(want_logits)
    want_stats = patch.return_stats if want_stats is None else bool(want_stats)

    # normalise positional arguments into keywords, by the original signature
    if args:
        try:
            bound = inner_sig.bind_partial(*args)
        except TypeError as exc:
            raise TypeError(f"{type(model).__name__}.forward: {exc}") from exc
        for k, v in bound.arguments.items():
            if k in kwargs:
                raise TypeError(f"{type(model).__name__}.forward: got multiple values for {k!r}")
            kwargs[k] = v
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)

    if labels is None and shift_labels is None:
        if keep is not None or ref is not None:
            raise ValueError(
                f"{patch.keep_key}/{patch.ref_key} given without labels: the keep mask only applies "
                "to a loss; pass labels too"
            )
        return inner_forward(**kwargs)

    head = _linear_head(model)
    cfg = _text_config(model)
    return_dict = kwargs.pop("return_dict", None)
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
    hidden = captured[0]

    # labels <-> hidden alignment
    lead = tuple(hidden.shape[:-1])
    shift = shift_labels is None
    y = labels if shift else shift_labels
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"labels: expected a LongTensor, got {type(y).__name__}")
    slice_last = 0
    if tuple(y.shape) != lead:
        ltk = kwargs.get("logits_to_keep", 0)
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
    if keep is not None:
        keep = _align(_as_keep(keep, patch.keep_key), patch.keep_key, tuple(y.shape), slice_last)
        keep = keep.to(hidden.device)
    if ref is not None:
        if not isinstance(ref, torch.Tensor) or not ref.dtype.is_floating_point:
            raise TypeError(f"{patch.ref_key}: expected a float tensor of reference log-probs")
        ref = _align(ref, patch.ref_key, tuple(y.shape), slice_last).to(hidden.device)
    pos = batch_position_ids(kwargs, y) if shift else None  # packed rows: documents
    num_items = _check_num_items(num_items, y, keep, shift, pos)

    weight = head.weight
    bias = head.bias
    if hasattr(weight, "full_tensor"):  # DTensor (FSDP2 / TP) parameters outside their forward
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    h = hidden
    if weight.dtype != h.dtype:  # autocast: the head would have run in the autocast dtype
        weight = weight.to(h.dtype)
    if bias is not None and bias.dtype != h.dtype:
        bias = bias.to(h.dtype)
    scale = _logit_scale(cfg)
    if scale != 1.0:
        h = h * scale
        bias = bias * scale if bias is not None else None
    softcap = getattr(cfg, "final_logit_softcapping", None)
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
        label_smoothing=patch.label_smoothing,
        z_loss=patch.z_loss,
        softcap=softcap,
        shift=shift,
        ref_logprobs=ref,
        select=patch.select,
        return_stats=need_stats,
        backend=patch.backend,
        position_ids=pos,
    )
    loss, stats = res if need_stats else (res, None)
    aux = getattr(out, "aux_loss", None)
    coef = getattr(cfg, "router_aux_loss_coef", None)
    if isinstance(aux, torch.Tensor) and coef is not None:  # MoE load balancing, as the models add it
        loss = loss + float(coef) * aux.to(loss.device)

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


def _mask_labels(labels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return labels
    keep = _as_keep(keep, "keep")
    if tuple(keep.shape) != tuple(labels.shape):
        raise ValueError(f"keep: expected shape {tuple(labels.shape)} (labels'), got {tuple(keep.shape)}")
    return labels.masked_fill(~keep.to(labels.device), -100)


class XTFTrainerMixin:
    """Mixin for ``transformers.Trainer`` subclasses that train with :func:`apply_xtf`.

    * patches the model with :func:`apply_xtf` at construction (unless already patched),
      with ``xtf_keep_key`` and the optional ``xtf_select`` policy;
    * counts ``num_items_in_batch`` over *kept* tokens: the Trainer's own count
      (``labels[..., 1:] != -100`` over the step's micro-batches, summed over ranks when
      ``average_tokens_across_devices``) is taken after masking the labels with the batch's
      keep mask, so the loss is the global mean over kept tokens under gradient accumulation
      and data parallelism;
    * registers a :class:`~xtf_kernels.xtf.dynamic.DynamicXTFCallback` for a
      :class:`~xtf_kernels.xtf.dynamic.DynamicXTF` policy, so its per-rule masked fractions
      appear in the Trainer's logs.

    Use as ``class MyTrainer(XTFTrainerMixin, Trainer)``; :class:`XTFTrainer` is that class.
    """

    def __init__(
        self,
        *args: Any,
        xtf_keep_key: str = "xtf_keep",
        xtf_select: Callable[[TokenStats], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        model = self.model  # type: ignore[attr-defined]
        if is_patched(model):
            patch = get_patch(model)
            if xtf_select is not None and patch.select is not xtf_select:
                raise ValueError(
                    "xtf_select: the model is already patched with another select policy; "
                    "revert(model) first or pass the policy to apply_xtf"
                )
        else:
            apply_xtf(model, keep_key=xtf_keep_key, select=xtf_select)
            patch = get_patch(model)
        self.xtf_keep_key = patch.keep_key
        policy = patch.select
        if policy is not None and hasattr(policy, "step_summary"):
            from ..xtf.dynamic import DynamicXTFCallback

            self.add_callback(DynamicXTFCallback(policy))  # type: ignore[attr-defined]

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluation: a dynamic policy still masks, but its step statistics are not touched."""
        policy = get_patch(self.model).select  # type: ignore[attr-defined]
        if policy is not None and hasattr(policy, "paused"):
            with policy.paused():
                return super().prediction_step(*args, **kwargs)  # type: ignore[misc]
        return super().prediction_step(*args, **kwargs)  # type: ignore[misc]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        from .collator import KEEP_FIELDS, REF_FIELDS

        cols = self._signature_columns  # type: ignore[has-type]
        for name in (*KEEP_FIELDS, *REF_FIELDS):  # record fields XTFCollator reads
            if name not in cols:
                cols.append(name)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        key = self.xtf_keep_key
        masked = []
        for b in batch_samples:
            if isinstance(b, Mapping) and key in b and "labels" in b and "shift_labels" not in b:
                b = {**b, "labels": _mask_labels(b["labels"], b[key])}
            if isinstance(b, Mapping) and "labels" in b and "shift_labels" not in b:
                b = {**b, "labels": mask_batch_labels(b, b["labels"])}  # packed rows: document starts
            masked.append(b)
        return super()._get_num_items_in_batch(masked, device)  # type: ignore[misc]


def _make_trainer_class() -> type:
    from transformers import Trainer

    return type(
        "XTFTrainer",
        (XTFTrainerMixin, Trainer),
        {"__doc__": "``transformers.Trainer`` with :class:`XTFTrainerMixin` (see there).",
         "__module__": __name__},
    )


def __getattr__(name: str) -> Any:
    if name == "XTFTrainer":  # built lazily: importing this module does not import the Trainer
        cls = _make_trainer_class()
        globals()["XTFTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CALL_KWARGS",
    "XTFPatch",
    "XTFTrainerMixin",
    "apply_xtf",
    "get_patch",
    "is_patched",
    "revert",
    "unwrap_model",
]
