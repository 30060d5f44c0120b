"""TRL integration: ``XTFSFTTrainer``, TRL's ``SFTTrainer`` whose loss is :func:`masked_ce`.

TRL's ``SFTTrainer`` patches the model with its own fused LM head and calls
``model(..., fused_lm_head=True)``; that path knows nothing of a keep mask. ``XTFSFTTrainer``
(``XTFTrainerMixin`` + ``SFTTrainer``) puts :func:`~xtf_kernels.integrations.apply_xtf` on
top, and its ``compute_loss`` calls the patched forward, so the loss is the mean over kept
tokens (global under gradient accumulation and data parallelism, see
:class:`~xtf_kernels.integrations.transformers.XTFTrainerMixin`). It logs ``entropy`` (mean
over scored tokens, from the same fused pass) and ``xtf/kept_fraction``; TRL's
``mean_token_accuracy`` needs an argmax over the vocabulary and is not logged.

``xtf/kept_fraction`` = trained tokens / response tokens of a micro-batch (all ranks; the log
averages it over the micro-batches since the last log, as TRL's own metrics): trained = a
label, the keep mask and any ``select`` policy agree; response = the tokens a
trainer would train on without XTF: those with a label, plus those the batch's
``xtf_response`` marks (``xtf export`` writes a ``response`` list that ``XTFCollator``
carries: its labels are -100 on masked tokens, so labels alone would give 1.0). Without
``xtf_response`` the response tokens are the labelled ones; a batch with neither a keep
mask nor ``xtf_response`` (TRL's own collator), under no ``select`` policy, logs no
``xtf/kept_fraction``: it would say 1.0 whatever the labels hide.

Data: pre-tokenised records (``input_ids``, ``labels``, ``keep``, ``response``: what
``xtf export`` writes) with ``data_collator=XTFCollator(pad_id)`` and
``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)``.
Padding-free: ``XTFCollator(pad_id, packing=True)`` with TRL's ``padding_free`` left False
(TRL refuses a custom collator with ``padding_free=True``).
TRL is an optional dependency (``pip install xtf-kernels[trl]``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..stats import TokenStats
from ._patch_state import RESPONSE_FIELDS, get_patch
from ._patched_forward import as_keep
from .distributed import count_kept_tokens
from .packed import batch_position_ids
from .transformers import XTFTrainerMixin


def kept_and_response(
    inputs: dict[str, Any], stats: TokenStats, keep_names: tuple[str, ...], has_policy: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(trained tokens, response tokens) of one micro-batch for ``xtf/kept_fraction`` (module docstring).

    Args:
        inputs: the batch the model was called with (``labels`` ``[B, L]`` int64, optional
            keep mask, ``xtf_response`` ``[B, L]`` bool, ``position_ids`` of packed rows).
        stats: the call's label-aligned :class:`TokenStats`.
        keep_names: the names the keep mask may come under.
        has_policy: whether a ``select`` policy masks tokens inside the loss.

    Returns:
        Two 0-d int64 tensors, or None when the batch cannot tell masked tokens apart.
    """
    kept = stats.keep.sum(dtype=torch.int64)
    resp = next((inputs[n] for n in RESPONSE_FIELDS if inputs.get(n) is not None), None)
    labels = inputs.get("labels")
    if resp is not None and isinstance(labels, torch.Tensor) and inputs.get("shift_labels") is None:
        counted = as_keep(resp, RESPONSE_FIELDS[1]).to(labels.device) | (labels != -100)
        n_resp = count_kept_tokens(torch.where(counted, 0, -100), shift=True,
                                   position_ids=batch_position_ids(inputs, labels))
        return kept, n_resp.to(kept.device)
    if not has_policy and all(inputs.get(n) is None for n in keep_names):
        return None
    return kept, (~torch.isnan(stats.lse)).sum(dtype=torch.int64)


def _make_sft_class() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError(
            "XTFSFTTrainer needs TRL: pip install 'xtf-kernels[trl]' (trl>=0.12)"
        ) from exc

    def compute_loss(
        self: Any,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        mode = "train" if self.model.training else "eval"
        inputs = {**inputs, "use_cache": False}
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs, xtf_return_stats=True)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: num_items counts every rank's tokens, DDP averages
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        stats = outputs.xtf_stats
        if stats is not None:
            scored = ~torch.isnan(stats.lse)
            n_scored = self.accelerator.gather_for_metrics(scored.sum()).sum()
            ent = self.accelerator.gather_for_metrics(
                torch.nan_to_num(stats.entropy, nan=0.0).sum()
            ).sum()
            n = float(n_scored)
            self._metrics[mode]["entropy"].append(float(ent) / n if n else 0.0)
            patch = get_patch(self.model)
            counts = kept_and_response(inputs, stats, patch.keep_names, patch.select is not None)
            if counts is not None:
                kept, n_resp = (float(self.accelerator.gather_for_metrics(c).sum()) for c in counts)
                self._metrics[mode]["xtf/kept_fraction"].append(kept / n_resp if n_resp else 0.0)
        # padding-free batches carry position_ids instead of an attention mask (as TRL counts)
        seen_here = inputs["attention_mask"].sum() if "attention_mask" in inputs else None
        if seen_here is None and isinstance(inputs.get("position_ids"), torch.Tensor):
            seen_here = torch.tensor(inputs["position_ids"].size(-1), device=inputs["position_ids"].device)
        if mode == "train" and seen_here is not None:
            seen = self.accelerator.gather_for_metrics(seen_here).sum().item()
            self._total_train_tokens += seen // getattr(self, "_tp_size", 1)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    return type(
        "XTFSFTTrainer",
        (XTFTrainerMixin, SFTTrainer),
        {
            "__doc__": "TRL ``SFTTrainer`` training with XTF keep masks (see the module docstring).",
            "__module__": __name__,
            "compute_loss": compute_loss,
        },
    )


def __getattr__(name: str) -> Any:
    if name == "XTFSFTTrainer":  # built lazily: importing this module does not import TRL
        cls = _make_sft_class()
        globals()["XTFSFTTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
