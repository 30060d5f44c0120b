"""The LM head of a Hugging Face causal LM, described once for every caller of ``masked_ce``.

A ``*ForCausalLM`` computes its logits as ``cap(scale * (hidden @ W.T + b))``: ``W`` and ``b``
are the weight and (optional) bias of ``get_output_embeddings()``, ``scale`` a post-head
multiplier some architectures read from the config (Cohere: ``* logit_scale``; Granite:
``/ logits_scaling``) and ``cap`` the optional final-logit soft-capping (Gemma 2). Multimodal
models keep these fields in the text config (``config.get_text_config()``).

:func:`lm_head_spec` reads all of it; :meth:`LMHeadSpec.operands` folds the scale into the
hidden states *and* the bias, so ``masked_ce(h, w, labels, bias=b, softcap=spec.softcap)``
sees exactly the model's logits. Used by the XTF scorers and by :func:`apply_xtf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LMHeadSpec", "lm_head_spec"]


@dataclass(frozen=True)
class LMHeadSpec:
    """What ``masked_ce`` needs to reproduce a causal LM's logits.

    Attributes:
        head: the module returned by ``get_output_embeddings()``.
        weight: ``[V, D]`` head weight (a parameter; may be a DTensor under FSDP2 / TP).
        bias: ``[V]`` head bias or None.
        logit_scale: multiplier applied to the head's output (1.0 for most models).
        softcap: final-logit soft-capping ``c * tanh(z / c)`` or None.
        text_config: the config these were read from (``get_text_config()`` when it exists).
    """

    head: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    text_config: Any

    def operands(self, hidden: torch.Tensor, *, gather: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(h, weight, bias)`` with ``h @ weight.T + bias == scale * (hidden @ W.T + b)``.

        The weight and bias are cast to ``hidden``'s dtype (under autocast the head would run
        in it) and, with ``gather``, gathered when they are DTensors (FSDP2 parameters read
        outside their module's forward); the logit scale multiplies the hidden states and the
        bias. ``gather=False`` keeps a tensor-parallel head's shards (``masked_ce`` then runs
        vocabulary-parallel on them).

        Args:
            hidden: ``[..., D]`` hidden states the head receives.
            gather: gather DTensor parameters into whole tensors.
        """
        weight, bias = self.weight, self.bias
        if gather and hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
        if gather and bias is not None and hasattr(bias, "full_tensor"):
            bias = bias.full_tensor()
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
        h = hidden
        if self.logit_scale != 1.0:
            h = h * self.logit_scale
            bias = None if bias is None else bias * self.logit_scale
        return h, weight, bias


def text_config(model: nn.Module) -> Any:
    """``model.config.get_text_config()`` when it exists (multimodal models), else ``model.config``."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"model: expected a Hugging Face model with a .config, got {type(model).__name__}")
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def logit_scale(cfg: Any) -> float:
    """Post-head multiplier of the logits: Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``."""
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    return scale


def lm_head_spec(model: nn.Module) -> LMHeadSpec:
    """Describe the LM head of a Hugging Face causal LM (see the module docstring).

    Args:
        model: a ``*ForCausalLM`` (unwrapped: not DDP / PEFT / ``torch.compile``).

    Raises:
        TypeError: ``model`` has no ``get_output_embeddings()`` or no ``.config``.
        ValueError: ``get_output_embeddings()`` is None or has no ``weight`` (a base model
            without LM head).
    """
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        raise TypeError(
            f"model: expected a Hugging Face *ForCausalLM with get_output_embeddings(), got "
            f"{type(model).__name__}"
        )
    head = get()
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"model: {type(model).__name__} has no LM head (get_output_embeddings() is "
            f"{type(head).__name__}); load a *ForCausalLM checkpoint"
        )
    cfg = text_config(model)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    bias = getattr(head, "bias", None)
    return LMHeadSpec(
        head=head,
        weight=weight,
        bias=bias if isinstance(bias, torch.Tensor) else None,
        logit_scale=logit_scale(cfg),
        softcap=None if softcap is None else float(softcap),
        text_config=cfg,
    )
