"""The state of an :func:`~xtf_kernels.integrations.apply_xtf` patch and how to find it on a model."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..stats import TokenStats

PATCH_ATTR = "_xtf_patch"

#: per-call keyword arguments understood by the patched forward (never passed to the model)
CALL_KWARGS = ("xtf_return_logits", "xtf_return_stats")
#: names accepted for the keep mask (besides ``apply_xtf(keep_key=...)``): ``keep`` is the
#: column ``xtf export`` writes, ``xtf_keep`` the batch field of :class:`XTFCollator`
KEEP_FIELDS = ("keep", "xtf_keep")
#: names accepted for reference log-probs (besides ``apply_xtf(ref_key=...)``)
REF_FIELDS = ("ref_logprobs", "xtf_ref_logprobs")
#: names accepted for the response mask (the tokens trained without XTF; ``xtf export``
#: writes ``response``): metadata for the trainers' ``xtf/kept_fraction``, not used by the loss
RESPONSE_FIELDS = ("response", "xtf_response")
#: loss arguments the patched forward takes out of every call
LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch")
#: keywords passed although the forward's signature does not name them: handled by
#: transformers' decorators (``return_dict``: ``can_return_tuple``; ``past_key_values``:
#: ``deprecate_kwarg``), passed by older code (``cache_position``), or produced by tokenizers
#: for models without token types (``token_type_ids``); none of them is a loss mask
PASSTHROUGH_KWARGS = ("return_dict", "past_key_values", "cache_position", "token_type_ids")
#: what a model with untyped ``**kwargs`` is refused: names that look like a mask or scores
MASK_LIKE = re.compile(r"keep|mask|logprob|response", re.IGNORECASE)


def _aliases(key: str, names: tuple[str, ...], explicit: frozenset[str]) -> tuple[str, ...]:
    """``key`` then the ``names`` the model's forward does not take itself, without repeats."""
    return tuple(dict.fromkeys((key, *(n for n in names if n not in explicit))))


def accepted_kwargs(sig: inspect.Signature) -> tuple[frozenset[str], frozenset[str] | None]:
    """(explicit parameter names, every keyword the forward takes or None when that is unknown).

    transformers' ``*ForCausalLM.forward(..., **kwargs: Unpack[TransformersKwargs])`` passes
    unknown keywords on to the attention layers, which ignore them: the set it takes is its
    explicit parameters plus the keys of that ``TypedDict`` (plus :data:`PASSTHROUGH_KWARGS`).
    A forward whose ``**kwargs`` is not annotated with a ``TypedDict`` gives None; one without
    ``**kwargs`` gives its parameters (Python itself refuses anything else).
    """
    explicit = frozenset(
        p.name for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )
    var_kw = [p for p in sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    if not var_kw:
        return explicit, explicit | frozenset(PASSTHROUGH_KWARGS)
    ann = var_kw[0].annotation
    origin = typing.get_origin(ann)  # typing.Unpack or typing_extensions.Unpack (distinct objects)
    if origin is not None and getattr(origin, "_name", None) == "Unpack":
        args = typing.get_args(ann)
        keys = getattr(args[0], "__annotations__", None) if len(args) == 1 else None
        if isinstance(keys, dict) and type(args[0]).__name__ == "_TypedDictMeta":
            return explicit, explicit | frozenset(keys) | frozenset(PASSTHROUGH_KWARGS)
    return explicit, None


class XTFPatch:
    """State of one :func:`apply_xtf` patch (stored on the model as ``model._xtf_patch``)."""

    def __init__(
        self,
        *,
        keep_key: str,
        ref_key: str,
        select: Callable[[TokenStats], torch.Tensor] | None,
        loss_options: dict[str, Any],
        return_logits: bool,
        return_stats: bool,
        had_prev: bool,
        prev_forward: Any,
        wrapper: Any,
        explicit: frozenset[str] = frozenset(),
        accepted: frozenset[str] | None = None,
    ) -> None:
        self.keep_key = keep_key
        self.ref_key = ref_key
        self.select = select
        #: keyword arguments of every masked_ce call, fixed at patch time (label_smoothing,
        #: z_loss, backend: forwarded as they are)
        self.loss_options = loss_options
        self.return_logits = return_logits
        self.return_stats = return_stats
        #: whether the instance had its own ``forward`` before (e.g. another wrapper)
        self.had_prev = had_prev
        self.prev_forward = prev_forward
        self.wrapper = wrapper
        #: the wrapped forward's explicit parameters (never taken as an alias)
        self.explicit = explicit
        #: every keyword the wrapped forward takes (None: unknown, only mask-like names refused)
        self.accepted = accepted
        #: names the keep mask / reference log-probs / response mask may come under, in order
        self.keep_names = _aliases(keep_key, KEEP_FIELDS, explicit)
        self.ref_names = _aliases(ref_key, REF_FIELDS, explicit)
        self.response_names = _aliases(RESPONSE_FIELDS[1], RESPONSE_FIELDS, explicit)

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
    return isinstance(unwrap_model(model).__dict__.get(PATCH_ATTR), XTFPatch)


def get_patch(model: nn.Module) -> XTFPatch:
    """The :class:`XTFPatch` of a patched model; ValueError when it is not patched."""
    patch = unwrap_model(model).__dict__.get(PATCH_ATTR)
    if not isinstance(patch, XTFPatch):
        raise ValueError("model: expected a model patched by apply_xtf(), got an unpatched one")
    return patch
