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

This module is the public face of the integration; the code lives in :mod:`.patch`
(:func:`apply_xtf`, :func:`revert`), :mod:`._patched_forward` (one patched call, phase by
phase), :mod:`._patch_state` (:class:`XTFPatch`, finding it on a wrapped model) and
:mod:`.trainer` (:class:`XTFTrainerMixin`, ``XTFTrainer``).
"""

from __future__ import annotations

from typing import Any

from ._patch_state import CALL_KWARGS, XTFPatch, get_patch, is_patched, unwrap_model
from .patch import apply_xtf, revert
from .trainer import XTFTrainerMixin, make_trainer_class


def __getattr__(name: str) -> Any:
    if name == "XTFTrainer":  # built lazily: importing this module does not import the Trainer
        cls = make_trainer_class()
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
