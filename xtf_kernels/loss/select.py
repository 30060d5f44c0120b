"""``select`` rules: :func:`rowwise` marks per-token rules, :func:`chunk_selector` adapts one to
a backend's ``row_select``, :func:`apply_select` runs a global rule on the whole statistics."""

from __future__ import annotations

import torch

from ..backends.base import RowSelect
from ..stats import TokenStats
from .spec import SelectFn
from .validate import check_select_output


def rowwise(select: SelectFn) -> SelectFn:
    """Mark a ``select`` rule as per-token (its decision for a token depends only on that token).

    A rowwise rule receives :class:`TokenStats` of any shape (masked_ce calls it on chunks of
    1-D statistics while the chunk's logits are in memory) and must return a bool mask of
    that shape. Statistics, selection and gradient then come from ONE logits GEMM (the
    gradient is formed in the forward). Threshold rules (XTF's KN rule, entropy, excess
    loss) are rowwise; rank-based rules (keep the top k%) are not.

    Usable as a decorator: ``@rowwise def kn(s): return s.prob <= 0.95``.
    """
    if not callable(select):
        raise TypeError(f"select: expected a callable, got {type(select).__name__}")
    try:
        select.rowwise = True  # type: ignore[attr-defined]
        return select
    except AttributeError:  # e.g. a builtin or a bound method: wrap it
        def wrapped(stats: TokenStats) -> torch.Tensor:
            return select(stats)

        wrapped.rowwise = True  # type: ignore[attr-defined]
        return wrapped


def is_rowwise(select: SelectFn | None) -> bool:
    """Whether ``select`` was marked by :func:`rowwise`."""
    return select is not None and bool(getattr(select, "rowwise", False))


def chunk_selector(
    select: SelectFn,
    *,
    x: torch.Tensor,
    rows: torch.Tensor,
    kept: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    task_vector: torch.Tensor | None,
    acc: torch.dtype,
) -> RowSelect:
    """Adapt a rowwise ``select`` to the backend's ``row_select(start, end, row_max, lse, gold, ent)``.

    ``x`` ``[M, D]`` are the compacted hidden rows, ``rows`` ``[M]`` their label positions,
    ``kept`` the flat ``[N]`` keep mask; the rule's answer is AND-ed with it.
    """
    kept_rows = kept.index_select(0, rows)
    ref_rows = None if ref_logprobs is None else ref_logprobs.reshape(-1).to(acc).index_select(0, rows)
    tv = None if task_vector is None else task_vector.to(x.device, acc).unsqueeze(0)

    def row_select(s: int, e: int, row_max: torch.Tensor, lse: torch.Tensor, gold: torch.Tensor,
                   ent: torch.Tensor) -> torch.Tensor:
        lp = gold - lse  # both relative to row_max
        stats = TokenStats(
            logprob=lp,
            prob=lp.exp(),
            entropy=ent,
            lse=row_max + lse,
            logprob_delta=None if ref_rows is None else lp - ref_rows[s:e],
            relevance=None if tv is None else torch.nn.functional.cosine_similarity(
                x[s:e].to(acc), tv, dim=1
            ),
            keep=kept_rows[s:e].clone(),
        )
        mask = check_select_output(select(stats), (e - s,), x.device)
        return mask & kept_rows[s:e]

    return row_select


def apply_select(select: SelectFn, stats: TokenStats, kept: torch.Tensor) -> torch.Tensor:
    """The flat keep mask after a global ``select`` rule saw every token's statistics."""
    shape = tuple(stats.keep.shape)
    sel = check_select_output(select(stats), shape, kept.device)
    return kept & sel.reshape(-1)
