"""The global kept-token count: the divisor that makes "mean over kept tokens" step-global.

With gradient accumulation over ``M`` micro-batches on ``N`` data-parallel ranks, the loss of
a step is ``sum over all kept tokens of the step / (number of kept tokens of the step)``. Each
micro-batch therefore calls ``masked_ce(..., reduction="mean", num_items=n)`` (or passes
``num_items_in_batch=n`` to a model patched by :func:`~xtf_kernels.integrations.apply_xtf`)
with the same ``n`` = the kept-token count over every micro-batch of the step on every rank,
all-reduced once per step. :func:`global_num_items` computes it.

DDP and FSDP2 (``fully_shard``) *average* gradients over ranks, i.e. divide the summed
gradient by the world size; :func:`global_num_items` (``average_across_ranks=True``, the
default) returns ``count / world_size`` so that the averaged gradient is exactly the gradient
of the global mean. With ``average_across_ranks=False`` it returns the exact count (for
summed gradients, or logging).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..documents import check_position_ids, counted_mask


def count_kept_tokens(
    labels: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Number of tokens that contribute to the loss of one micro-batch (no host sync).

    Args:
        labels: ``[..., L]`` integer labels (``ignore_index`` = not trained).
        keep: optional ``[..., L]`` bool (or 0/1 integer) keep mask, label-aligned
            (False = masked).
        ignore_index: label value that is never trained.
        shift: True for the causal-LM shift (position 0 of each sequence has no predictor and
            is not counted), as ``masked_ce(..., shift=True)`` and the Trainer's count.
        position_ids: optional ``[..., L]`` integers of packed rows (labels' shape); the label
            at each document start (``position_ids == 0``) is not counted, as in
            ``masked_ce(..., position_ids=...)`` (see :mod:`xtf_kernels.documents`).

    Returns:
        A 0-d int64 tensor on ``labels.device``.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift: expected a bool, got {type(shift).__name__}")
    if keep is not None:
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"keep: expected a bool tensor, got {type(keep).__name__}")
        if keep.dtype.is_floating_point or keep.is_complex():
            raise TypeError(f"keep: expected a bool (or 0/1 integer) tensor, got {keep.dtype}")
        if tuple(keep.shape) != tuple(labels.shape):
            raise ValueError(f"keep: expected shape {tuple(labels.shape)} (labels'), got {tuple(keep.shape)}")
    if shift and labels.dim() < 1:
        raise ValueError("labels: shift=True needs a sequence dimension, got a 0-d tensor")
    if position_ids is not None:
        check_position_ids(position_ids, labels)
    valid = counted_mask(labels, keep, ignore_index=ignore_index, shift=shift, position_ids=position_ids)
    return valid.sum(dtype=torch.int64)


def _split_item(item: Any, labels_key: str, keep_key: str) -> tuple[Any, Any, Any]:
    """(labels, keep, position_ids) of one micro-batch."""
    if isinstance(item, torch.Tensor):
        return item, None, None
    if isinstance(item, Mapping):
        if labels_key not in item:
            raise ValueError(f"batches: a batch has no {labels_key!r} field (keys: {sorted(item)})")
        pos = item.get("position_ids")
        if isinstance(pos, torch.Tensor) and tuple(pos.shape) != tuple(item[labels_key].shape):
            pos = None  # e.g. multimodal rotary positions [3, B, L]: they do not mark documents
        return item[labels_key], item.get(keep_key), pos
    if isinstance(item, tuple | list) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise TypeError(
        "batches: expected labels tensors, (labels, keep[, position_ids]) tuples or batch dicts, got "
        f"{type(item).__name__}"
    )


def global_num_items(
    batches: Sequence[Any],
    *,
    keep_key: str = "xtf_keep",
    labels_key: str = "labels",
    ignore_index: int = -100,
    shift: bool = True,
    group: Any = None,
    average_across_ranks: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Kept-token count of one optimizer step over all its micro-batches and all ranks.

    Counts locally (no host sync), then does ONE ``all_reduce(SUM)`` when
    ``torch.distributed`` is initialised with more than one rank in ``group``.

    Args:
        batches: the step's micro-batches on this rank, each a labels tensor ``[B, L]``, a
            ``(labels, keep)`` pair or ``(labels, keep, position_ids)`` triple, or a batch dict
            with ``labels_key`` and optionally ``keep_key`` and ``position_ids`` (packed rows:
            document starts are not counted; see :func:`count_kept_tokens`).
        keep_key: keep-mask field of batch dicts.
        labels_key: labels field of batch dicts.
        ignore_index: label value that is never trained.
        shift: causal-LM shift (see :func:`count_kept_tokens`).
        group: process group (default: the world).
        average_across_ranks: True (DDP / FSDP2, which average gradients over ranks): return
            ``count / world_size`` (float64) so the averaged gradient equals the gradient of the
            global mean; False: the exact global count (int64).
        device: where the all-reduce runs (default: the first labels tensor's device; use the
            GPU under NCCL).

    Returns:
        A 0-d tensor: pass it as ``num_items`` to :func:`xtf_kernels.masked_ce` or as
        ``num_items_in_batch`` to a model patched by ``apply_xtf`` for every micro-batch of the
        step. It is 0 when nothing of the step is kept anywhere (those calls then give a zero
        loss with zero gradients).
    """
    if isinstance(batches, torch.Tensor | Mapping) or not isinstance(batches, Sequence):
        raise TypeError(
            "batches: expected a list of the step's micro-batches (tensors, pairs or dicts), got "
            f"{type(batches).__name__}"
        )
    if len(batches) == 0:
        raise ValueError("batches: expected at least one micro-batch, got an empty list")
    if not isinstance(average_across_ranks, bool):
        raise TypeError(f"average_across_ranks: expected a bool, got {type(average_across_ranks).__name__}")
    total: torch.Tensor | None = None
    for item in batches:
        labels, keep, pos = _split_item(item, labels_key, keep_key)
        n = count_kept_tokens(labels, keep, ignore_index=ignore_index, shift=shift, position_ids=pos)
        total = n if total is None else total + n.to(total.device)
    assert total is not None
    if device is not None:
        total = total.to(device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if average_across_ranks and world > 1:
        return total.to(torch.float64) / world
    return total


def data_parallel_world_size(group: Any = None) -> int:
    """World size of ``group`` when ``torch.distributed`` is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


__all__ = ["count_kept_tokens", "data_parallel_world_size", "global_num_items"]
