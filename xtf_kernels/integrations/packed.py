"""Packed (padding-free) batches in the integrations: where their documents come from.

transformers' ``DataCollatorWithFlattening`` and TRL's ``padding_free=True`` hand the model
one row of concatenated examples with ``position_ids`` restarting at 0 per example (and,
optionally, flash-attention's ``cu_seq_lens_q/k``, ``max_length_q/k``). The patched forward
passes all of them to the model unchanged and gives the label-aligned ``position_ids`` to
``masked_ce``, so a label at a document start is never predicted from the previous document
(see :mod:`xtf_kernels.documents` for the rule). ``XTFCollator(packing=True)`` builds such
batches from ``xtf export`` records (:func:`flatten_records`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..documents import mask_unpredicted, position_ids_from_cu_seqlens


def batch_position_ids(batch: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor | None:
    """Label-aligned ``position_ids`` of a model call / batch, or None when it marks no documents.

    Read from ``position_ids`` when it has the labels' leading shape and at least their length
    (the last ``labels.shape[-1]`` positions are used, as with ``logits_to_keep``); multimodal
    rotary positions (``[3, B, L]``) are ignored. Else from ``cu_seq_lens_q`` for a single
    packed row of the labels' full length.
    """
    pos = batch.get("position_ids")
    n = labels.shape[-1] if labels.dim() else 0
    if isinstance(pos, torch.Tensor) and labels.dim() >= 1:
        if pos.dim() == labels.dim() and tuple(pos.shape[:-1]) == tuple(labels.shape[:-1]) and pos.shape[-1] >= n:
            return pos[..., pos.shape[-1] - n:].to(labels.device)
        return None
    cu = batch.get("cu_seq_lens_q")
    if isinstance(cu, torch.Tensor) and labels.dim() == 2 and labels.shape[0] == 1:
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] != n:
            return None  # labels cover part of the row only: offsets do not apply
        return position_ids_from_cu_seqlens(cu, n).to(labels.device)
    return None


def mask_batch_labels(batch: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with -100 at the document starts of a packed batch (unchanged otherwise)."""
    return mask_unpredicted(labels, batch_position_ids(batch, labels))


def flatten_records(
    rows: Sequence[tuple[list, ...]],
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None,
    flash_attn_kwargs: bool,
) -> dict[str, torch.Tensor | int]:
    """One packed row from parsed records ``(ids, labels, keep, ref[, response])``.

    Returns ``input_ids``, ``labels`` (-100 at each record's first token, as transformers'
    ``DataCollatorWithFlattening``), ``position_ids`` (0, 1, ... per record), ``keep``
    (per-token, aligned; True where a record has none), ``ref`` (NaN where absent, or None
    when no record has reference log-probs), ``response`` (bool, or None when no record has
    a response mask), all ``[1, T]``; padding (``pad_to_multiple_of``)
    adds one-token documents of ``pad_token_id`` with label -100 and keep False, as TRL pads.
    With ``flash_attn_kwargs``: ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (int).
    """
    ids: list[int] = []
    lab: list[int] = []
    pos: list[int] = []
    keep: list[bool] = []
    ref: list[float] = []
    resp: list[bool] = []
    lengths = []
    for row in rows:
        r_ids, r_lab, r_keep, r_ref = row[:4]
        r_resp = row[4] if len(row) > 4 else None
        n = len(r_ids)
        lengths.append(n)
        ids += r_ids
        lab += [-100] + list(r_lab[1:])
        pos += range(n)
        keep += [True] * n if r_keep is None else list(r_keep)
        ref += [float("nan")] * n if r_ref is None else list(r_ref)
        resp += [False] * n if r_resp is None else list(r_resp)
    T = len(ids)
    if pad_to_multiple_of:
        pad = -T % pad_to_multiple_of
        ids += [pad_token_id] * pad
        lab += [-100] * pad
        pos += [0] * pad
        keep += [False] * pad
        ref += [float("nan")] * pad
        resp += [False] * pad
        lengths += [1] * pad
    out: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([lab], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "keep": torch.tensor([keep], dtype=torch.bool),
        "ref": torch.tensor([ref], dtype=torch.float32) if any(r[3] is not None for r in rows) else None,
        "response": torch.tensor([resp], dtype=torch.bool) if any(len(r) > 4 and r[4] is not None for r in rows)
        else None,
    }
    if flash_attn_kwargs:
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = max(lengths)
    return out


__all__ = ["batch_position_ids", "flatten_records", "mask_batch_labels"]
