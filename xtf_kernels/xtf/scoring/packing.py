"""Packing examples into rows for scoring (``score_dataset(..., pack=True)``): plan and bookkeeping.

* :func:`plan_rows`: deterministic first-fit decreasing. Examples are taken longest first
  (ties: in dataset order) and each goes into the first row that still has room for it, else
  opens a new row of ``capacity`` tokens. Whole examples only; rows keep their creation order
  and list their examples in the order they were placed.
* :func:`make_packed_batch`: tensors of a group of rows, ``position_ids`` restarting at 0 per
  example, right padding to the group's longest row (padding continues the last document's
  positions and has ``attention_mask`` 0).
* :func:`packing_counts`: positions a padded run and a packed run feed the model (the padding
  saved); :func:`near_threshold_count`: response tokens whose score lies within ``tol`` of a
  rule's threshold (their keep bit may differ from an unpacked run by float rounding).

Packing happens inside a shard (the unit of resume and of distribution), so the shards, their
examples and the records written are those of an unpacked run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..rules import RuleConfig

__all__ = ["PackedBatch", "plan_rows", "make_packed_batch", "packing_counts", "packing_summary",
           "near_threshold_count", "NEAR_THRESHOLD_TOL"]

#: scores this close to a threshold are counted as possibly flipping between packed and padded runs
NEAR_THRESHOLD_TOL = 1e-5


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each row's total length ``<= capacity`` (first-fit decreasing).

    Args:
        lengths: token count of every example (each ``1 <= n <= capacity``).
        capacity: tokens per row.

    Returns:
        A list of rows, each a list of indices into ``lengths``; every index appears once.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity: expected a positive int, got {capacity!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        if not 1 <= n <= capacity:
            raise ValueError(f"lengths[{i}]: expected 1..{capacity} tokens, got {n}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


@dataclass(frozen=True)
class PackedBatch:
    """Tensors of packed rows ``[R, L]`` and where each example lies: ``spans[k] = (index, row, start, n)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    spans: tuple[tuple[int, int, int, int], ...]


def make_packed_batch(rows: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]], pad_id: int,
                      device: torch.device | str) -> PackedBatch:
    """The tensors of ``rows`` (lists of indices into ``token_ids``), right-padded to the longest row."""
    totals = [sum(len(token_ids[i]) for i in row) for row in rows]
    L = max(totals)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        s = 0
        for i in row:
            n = len(token_ids[i])
            ids[r, s : s + n] = torch.as_tensor(token_ids[i], dtype=torch.long)
            pos[r, s : s + n] = torch.arange(n)
            spans.append((i, r, s, n))
            s += n
        mask[r, :s] = 1
        if s < L:  # padding continues the last document: it never starts one
            start = int(pos[r, s - 1]) + 1
            pos[r, s:] = torch.arange(start, start + L - s)
    return PackedBatch(ids.to(device), mask.to(device), pos.to(device), tuple(spans))


def packing_counts(lengths: Sequence[int], rows: Sequence[Sequence[int]], batch_size: int) -> dict[str, int]:
    """Positions fed to the model by the padded run (``batch_size`` examples per right-padded
    batch, in order) and by the packed run (``batch_size`` rows per batch), and real tokens."""
    n = [int(x) for x in lengths]
    padded = sum(len(n[s : s + batch_size]) * max(n[s : s + batch_size]) for s in range(0, len(n), batch_size))
    totals = [sum(n[i] for i in row) for row in rows]
    packed = sum(len(totals[s : s + batch_size]) * max(totals[s : s + batch_size])
                 for s in range(0, len(totals), batch_size))
    return {"tokens": sum(n), "rows": len(rows), "positions_padded": padded, "positions_packed": packed}


def packing_summary(counts: dict[str, int], near: int) -> dict:
    """The ``summary["packing"]`` entry from summed :func:`packing_counts` and the near-threshold count."""
    tok, pad, pk = counts["tokens"], counts["positions_padded"], counts["positions_packed"]
    return {
        **counts,
        "padding_share_padded": (pad - tok) / pad if pad else 0.0,
        "padding_share_packed": (pk - tok) / pk if pk else 0.0,
        "positions_saved": 1.0 - pk / pad if pad else 0.0,
        "near_threshold_tokens": int(near),
        "near_threshold_tol": NEAR_THRESHOLD_TOL,
    }


def near_threshold_count(cols: dict[str, np.ndarray], rules: RuleConfig, tr_thresholds, *,
                         tol: float = NEAR_THRESHOLD_TOL) -> int:
    """Response tokens with a score within ``tol`` of its threshold (enabled rules; protected ids excluded).

    ``cols`` holds the final shard's ``is_response``, ``ri``, ``ri_fence``, ``kn``, ``tr`` and
    ``token_id``. The RI threshold is the token's sequence fence, KN's ``kn_threshold``, TR's
    the Multi-Otsu thresholds.
    """
    resp = np.asarray(cols["is_response"], dtype=bool)
    near = np.zeros(resp.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        if "ri" in rules.enabled:
            near |= np.abs(cols["ri"].astype(np.float64) - cols["ri_fence"].astype(np.float64)) <= tol
        if "kn" in rules.enabled:
            near |= np.abs(cols["kn"].astype(np.float64) - rules.kn_threshold) <= tol
        if "tr" in rules.enabled and tr_thresholds is not None:
            tr = cols["tr"].astype(np.float64)
            for t in np.asarray(tr_thresholds, dtype=np.float64).reshape(-1):
                near |= np.abs(tr - t) <= tol
    if rules.protect:
        near &= ~np.isin(np.asarray(cols["token_id"], dtype=np.int64), np.asarray(rules.protect, dtype=np.int64))
    return int((near & resp).sum())
