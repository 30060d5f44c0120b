"""The state of an :func:`~xtf_kernels.integrations.apply_xtf` patch and how to find it on a model."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..stats import TokenStats

PATCH_ATTR = "_xtf_patch"

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
    return isinstance(unwrap_model(model).__dict__.get(PATCH_ATTR), XTFPatch)


def get_patch(model: nn.Module) -> XTFPatch:
    """The :class:`XTFPatch` of a patched model; ValueError when it is not patched."""
    patch = unwrap_model(model).__dict__.get(PATCH_ATTR)
    if not isinstance(patch, XTFPatch):
        raise ValueError("model: expected a model patched by apply_xtf(), got an unpatched one")
    return patch
