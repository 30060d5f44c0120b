"""Model patching: :func:`apply_xtf` and :func:`revert` (see :mod:`xtf_kernels.integrations.transformers`).

The patch replaces one model instance's ``forward`` (never its class) by a wrapper that calls
:func:`~xtf_kernels.integrations._patched_forward.patched_call`; its state is an
:class:`XTFPatch` stored on the instance.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..lm_head import text_config
from ..loss.validate import check_loss_options
from ..stats import TokenStats
from ._patch_state import (
    KEEP_FIELDS,
    PATCH_ATTR,
    REF_FIELDS,
    RESPONSE_FIELDS,
    XTFPatch,
    accepted_kwargs,
    get_patch,
    is_patched,
    unwrap_model,
)
from ._patched_forward import linear_head_spec, patched_call

__all__ = ["apply_xtf", "revert"]


def _check_options(keep_key: Any, ref_key: Any, select: Any, label_smoothing: Any, z_loss: Any,
                   return_logits: Any, return_stats: Any, backend: Any) -> None:
    for name, val in (("keep_key", keep_key), ("ref_key", ref_key)):
        if not isinstance(val, str) or not val.isidentifier():
            raise ValueError(f"{name}: expected a Python identifier string, got {val!r}")
    if keep_key == ref_key:
        raise ValueError(f"keep_key and ref_key must differ, both are {keep_key!r}")
    for name, val, taken in (("keep_key", keep_key, REF_FIELDS + RESPONSE_FIELDS),
                             ("ref_key", ref_key, KEEP_FIELDS + RESPONSE_FIELDS)):
        if val in taken:
            raise ValueError(f"{name}: {val!r} is the name of another XTF field ({', '.join(taken)}); pick another")
    check_loss_options(label_smoothing=label_smoothing, z_loss=z_loss, select=select, backend=backend)
    for name, val in (("return_logits", return_logits), ("return_stats", return_stats)):
        if not isinstance(val, bool):
            raise TypeError(f"{name}: expected a bool, got {type(val).__name__}")


def _signature_with(inner_sig: inspect.Signature, extras: tuple[str, ...]) -> inspect.Signature:
    """``inner_sig`` plus keyword-only ``extras`` (the Trainer keeps only the columns it names)."""
    params = [p for p in inner_sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in inner_sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    for extra in dict.fromkeys(extras):
        if extra not in names:
            params.append(inspect.Parameter(extra, inspect.Parameter.KEYWORD_ONLY, default=None))
    if not var_kw:
        var_kw = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    # the function's own signature starts with self, which binding to the model drops
    self_param = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return inner_sig.replace(parameters=self_param + params + var_kw)


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

    Keywords: the keep mask is also taken under ``keep`` (the column ``xtf export`` writes)
    and ``xtf_keep``, reference log-probs under ``ref_logprobs`` / ``xtf_ref_logprobs``
    (one name per call: two names for the same field are a ValueError), and
    ``xtf_response`` / ``response`` (the response tokens, validated and not used by the loss;
    trainers count ``xtf/kept_fraction`` against it). A call with labels refuses (TypeError)
    any other keyword the model's forward does not take: transformers passes unknown
    keywords on to the attention layers, which ignore them, so a misspelt mask would give
    the unmasked loss. The keywords a model takes are its forward's parameters, the keys of
    its ``**kwargs: Unpack[TransformersKwargs]`` and ``return_dict`` / ``past_key_values`` /
    ``cache_position`` / ``token_type_ids``; a keyword given as None is never refused; a
    forward with untyped ``**kwargs`` has only mask-like names (containing ``keep``,
    ``mask``, ``logprob`` or ``response``) refused.

    Args:
        model: a ``*ForCausalLM`` (also accepted wrapped in PEFT / DDP / ``torch.compile``;
            the inner model is patched) whose ``get_output_embeddings()`` is an ``nn.Linear``
            (tied or not, with or without bias). Gemma 2's ``final_logit_softcapping`` and
            Cohere / Granite logit scales are read from the config.
        keep_key: name of the batch field holding the keep mask: ``[B, L]`` bool (or 0/1
            integers), label-aligned, False = masked token (no loss, no gradient);
            ``keep`` and ``xtf_keep`` are accepted too.
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
    _check_options(keep_key, ref_key, select, label_smoothing, z_loss, return_logits, return_stats, backend)
    target = unwrap_model(model)
    if is_patched(target):
        raise ValueError(
            f"model: {type(target).__name__} is already patched by apply_xtf(); call revert(model) first"
        )
    linear_head_spec(target)  # fail now, not at the first training step
    text_config(target)

    had_prev = "forward" in target.__dict__
    prev_forward = target.__dict__.get("forward")
    inner_sig = inspect.signature(target.forward)
    explicit, accepted = accepted_kwargs(inner_sig)

    def xtf_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # everything is read from the instance, so copy.deepcopy(model) gets its own patch
        patch = self.__dict__.get(PATCH_ATTR)
        if not isinstance(patch, XTFPatch):
            raise RuntimeError("apply_xtf: patched forward called on a model without its patch state")
        return patched_call(self, patch.inner_forward(self), inner_sig, patch, args, kwargs)

    extras = (keep_key, *KEEP_FIELDS, ref_key, *REF_FIELDS, *RESPONSE_FIELDS)  # the Trainer keeps these columns
    xtf_forward.__signature__ = _signature_with(inner_sig, extras)  # type: ignore[attr-defined]
    xtf_forward.__doc__ = (
        f"{type(target).__name__}.forward patched by xtf_kernels apply_xtf (keep_key={keep_key!r})."
    )
    bound = types.MethodType(xtf_forward, target)
    target.forward = bound
    target.__dict__[PATCH_ATTR] = XTFPatch(
        keep_key=keep_key,
        ref_key=ref_key,
        select=select,
        loss_options=dict(label_smoothing=float(label_smoothing), z_loss=float(z_loss), backend=backend),
        return_logits=return_logits,
        return_stats=return_stats,
        had_prev=had_prev,
        prev_forward=prev_forward,
        wrapper=bound,
        explicit=explicit,
        accepted=accepted,
    )
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
    del target.__dict__[PATCH_ATTR]
    return model
