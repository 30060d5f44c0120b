"""The Trainer side: :class:`XTFTrainerMixin` and the ``XTFTrainer`` class built from it.

``XTFTrainer`` is built on first access (``transformers.Trainer`` is imported then, not when
this module is imported); import it from :mod:`xtf_kernels.integrations.transformers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..stats import TokenStats
from ._patch_state import KEEP_FIELDS, REF_FIELDS, RESPONSE_FIELDS, get_patch, is_patched
from ._patched_forward import as_keep
from .packed import mask_batch_labels
from .patch import apply_xtf

__all__ = ["XTFTrainerMixin", "make_trainer_class"]


def _mask_labels(labels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return labels
    keep = as_keep(keep, "keep")
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
        cols = self._signature_columns  # type: ignore[has-type]
        for name in (*KEEP_FIELDS, *REF_FIELDS, *RESPONSE_FIELDS):  # record fields XTFCollator reads
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


def make_trainer_class() -> type:
    from transformers import Trainer

    return type(
        "XTFTrainer",
        (XTFTrainerMixin, Trainer),
        {"__doc__": "``transformers.Trainer`` with :class:`XTFTrainerMixin` (see there).",
         "__module__": "xtf_kernels.integrations.transformers"},
    )
