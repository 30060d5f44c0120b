"""What a packed (padding-free) row is: its documents, and which labels have a predictor.

Packed batches (transformers' ``DataCollatorWithFlattening``, TRL's ``padding_free=True`` /
``packing=True``, ``XTFCollator(packing=True)``, ``score_dataset(..., pack=True)``) put
several examples in one row and restart ``position_ids`` at 0 for each. A document starts at
every position whose ``position_ids`` is 0, at every ``cu_seqlens`` offset, and at the start
of every row (flash-attention's rule): :func:`document_starts`,
:func:`starts_from_cu_seqlens`. :func:`document_bounds` turns the starts into each token's
document ``[start, end)`` (:class:`Documents`); the attention scorer's visibility rule, the
debiased RI of packed scoring and :func:`position_ids_from_cu_seqlens` all read them from
here.

With the causal shift, the label at position ``t`` is predicted from the hidden state at
``t - 1``; at a document start that hidden state belongs to the previous document, so that
label has no predictor: :func:`predicted_mask` is False there, exactly as when each document
runs alone (where the start is position 0 of its own row). ``masked_ce(position_ids=...)``,
the ``num_items`` checks, :func:`~xtf_kernels.integrations.count_kept_tokens` and the
Trainer's kept-token count all call it.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def check_position_ids(position_ids: Any, labels: torch.Tensor, name: str = "position_ids") -> torch.Tensor:
    """Validate ``position_ids``: an integer tensor with ``labels``' shape (at least 1-D) and device.

    Returns:
        ``position_ids`` unchanged. Raises TypeError / ValueError naming ``name``.
    """
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype == torch.bool or position_ids.dtype.is_floating_point or position_ids.is_complex():
        raise TypeError(f"{name}: expected an integer tensor (int64), got {position_ids.dtype}")
    if tuple(position_ids.shape) != tuple(labels.shape):
        raise ValueError(
            f"{name}: expected shape {tuple(labels.shape)} (the labels'), got {tuple(position_ids.shape)}"
        )
    if position_ids.dim() < 1:
        raise ValueError(f"{name}: expected a sequence dimension, got a 0-d tensor")
    if position_ids.device != labels.device:
        raise ValueError(f"{name}: expected the labels' device {labels.device}, got {position_ids.device}")
    return position_ids


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., L]``: True where a document starts (``position_ids == 0``, and position 0 of every row).

    Args:
        position_ids: ``[..., L]`` integers; documents restart at 0.
    """
    starts = position_ids == 0
    starts[..., :1] = True
    return starts


def predicted_mask(shape: tuple[int, ...], position_ids: torch.Tensor | None, shift: bool,
                   device: torch.device | str | None = None) -> torch.Tensor | None:
    """Bool mask of the label positions that have a predictor; None when every position has one.

    Args:
        shape: the labels' shape ``[..., L]``.
        position_ids: ``[..., L]`` or None (one document per row).
        shift: the causal-LM shift (label ``t`` predicted from ``t - 1``). Without it every
            position has a predictor and ``position_ids`` must be None (with pre-shifted
            labels a cross-document target sits at the end of a document: mask it in the
            labels).
        device: where the mask lives (default: ``position_ids``' device, else the CPU).

    Returns:
        None (no shift) or a bool tensor of ``shape``: False at position 0 of every row and
        at every document start.
    """
    if not shift:
        if position_ids is not None:
            raise ValueError(
                "position_ids: only used with shift=True (pre-shifted labels are already aligned to "
                "their predictors; set the targets that cross documents to ignore_index instead)"
            )
        return None
    if position_ids is not None:
        return ~document_starts(position_ids.to(device) if device is not None else position_ids)
    if len(shape) < 1:
        raise ValueError("shift: needs labels with a sequence dimension, got a 0-d tensor")
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[..., :1] = False
    return mask


def counted_mask(labels: torch.Tensor, keep: torch.Tensor | None = None, *, ignore_index: int = -100,
                 shift: bool = True, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[...]``: the label positions that enter the loss (not ignored, kept, predicted).

    ``keep`` (bool or 0/1 integers) and ``position_ids`` have the labels' shape (validated by
    the caller). The count of this mask is the ``num_items`` of a micro-batch.
    """
    mask = labels != ignore_index
    if keep is not None:
        mask = mask & (keep.to(labels.device) != 0)
    pred = predicted_mask(tuple(labels.shape), position_ids, shift, labels.device)
    return mask if pred is None else mask & pred


def mask_unpredicted(labels: torch.Tensor, position_ids: torch.Tensor | None, ignore_index: int = -100,
                     shift: bool = True) -> torch.Tensor:
    """``labels`` with ``ignore_index`` at the document starts (a new tensor; the input is untouched)."""
    if position_ids is None:
        return labels
    if not shift:
        predicted_mask(tuple(labels.shape), position_ids, shift)  # raises: position_ids need the shift
    return labels.masked_fill(document_starts(position_ids.to(labels.device)), ignore_index)


def starts_from_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``[n]``: True at every offset below ``n`` and at position 0 (offsets ``>= n`` are ignored).

    Args:
        cu_seqlens: 1-D int offsets of documents in ``n`` flattened tokens (their order is the caller's check).
        n: number of tokens.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError("cu_seqlens: expected a 1-D integer tensor of document offsets")
    cu = cu_seqlens.to(torch.int64)
    starts = torch.zeros(n, dtype=torch.bool, device=cu.device)
    starts[cu[cu < n]] = True
    starts[:1] = True
    return starts


@dataclass(frozen=True)
class Documents:
    """Document layout of packed rows: for every token, its document's ``[start, end)`` in the row.

    ``start`` and ``end`` are int64 ``[B, L]``; two tokens of a row share a document iff their
    ``start`` values are equal. ``start`` is non-decreasing along a row.
    """

    start: torch.Tensor
    end: torch.Tensor

    def rows(self, sl: slice) -> Documents:
        return Documents(self.start[sl], self.end[sl])


def document_bounds(starts: torch.Tensor) -> Documents:
    """Each token's document ``[start, end)`` from bool ``starts [B, L]`` (position 0 always starts one)."""
    if not isinstance(starts, torch.Tensor) or starts.dtype != torch.bool or starts.dim() != 2:
        raise ValueError(f"starts: expected a 2-D bool tensor [B, L], got {getattr(starts, 'shape', type(starts))}")
    B, L = starts.shape
    starts = starts.clone()
    starts[:, :1] = True
    idx = torch.arange(L, device=starts.device).expand(B, L)
    start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    nxt = torch.full((B, L), L, dtype=torch.int64, device=starts.device)
    nxt[:, :-1] = torch.where(starts[:, 1:], idx[:, 1:], torch.full_like(idx[:, 1:], L))
    end = nxt.flip(1).cummin(dim=1).values.flip(1)
    return Documents(start, end)


def documents(position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, B: int, L: int,
              device: torch.device) -> Documents | None:
    """The :class:`Documents` of ``B`` rows of ``L`` tokens; None when every row is one document.

    Args:
        position_ids: ``[B, L]`` or ``[1, L]`` integers, or None.
        cu_seqlens: 1-D offsets over the flattened ``B * L`` tokens (a document never crosses
            a row), or None. At most one of the two (validated by the caller).
    """
    if position_ids is not None:
        starts = document_starts(position_ids.to(device).expand(B, L))
    elif cu_seqlens is not None:
        starts = starts_from_cu_seqlens(cu_seqlens.to(device), B * L).view(B, L)
    else:
        return None
    if not bool(starts[:, 1:].any()):
        return None
    return document_bounds(starts)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """``[1, length]`` int64 position ids of documents given by flash-attention offsets.

    Args:
        cu_seqlens: 1-D non-decreasing offsets from 0 (``cu_seq_lens_q`` of padding-free
            batches); tokens past the last offset form one more document.
        length: number of tokens in the (single) packed row.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError("cu_seqlens: expected a 1-D integer tensor of document offsets")
    cu = cu_seqlens.to(torch.int64)
    if cu.numel() == 0 or int(cu[0]) != 0 or bool((cu.diff() < 0).any()) or int(cu[-1]) > length:
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to at most {length}, got {cu.tolist()[:8]}")
    idx = torch.arange(length, dtype=torch.int64, device=cu.device)
    return (idx - document_bounds(starts_from_cu_seqlens(cu, length)[None]).start[0]).unsqueeze(0)


__all__ = [
    "Documents",
    "check_position_ids",
    "counted_mask",
    "document_bounds",
    "document_starts",
    "documents",
    "mask_unpredicted",
    "position_ids_from_cu_seqlens",
    "predicted_mask",
    "starts_from_cu_seqlens",
]
