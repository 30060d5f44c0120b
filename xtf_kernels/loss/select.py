"""``select`` rules: :func:`rowwise` marks per-token rules, :func:`chunk_selector` adapts one to
a backend's ``row_select``, :func:`apply_select` runs a global rule on the whole statistics."""

from __future__ import annotations

import torch

from ..backends.base import RowSelect, RowStats
from ..stats import TokenStats
from .core import token_stats
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
    rows: torch.Tensor,
    kept: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    relevance: torch.Tensor | None,
    acc: torch.dtype,
) -> RowSelect:
    """Adapt a rowwise ``select`` to the backend's ``row_select(start, end, row_max, lse, gold, ent)``.

    ``rows`` ``[M]`` are the label positions of the compacted rows, ``kept`` the flat ``[N]``
    keep mask (the rule's answer is AND-ed with it), ``ref_logprobs`` the caller's (any shape,
    ``N`` elements) or None, ``relevance`` ``[M]`` the rows' cosine relevance or None.
    """
    kept_rows = kept.index_select(0, rows)
    ref_rows = None if ref_logprobs is None else ref_logprobs.reshape(-1).to(acc).index_select(0, rows)

    def row_select(s: int, e: int, row_max: torch.Tensor, lse: torch.Tensor, gold: torch.Tensor,
                   ent: torch.Tensor) -> torch.Tensor:
        stats = token_stats(
            RowStats(row_max, lse, gold, ent, sum_logits=None),  # type: ignore[arg-type]  (unread)
            keep=kept_rows[s:e].clone(),
            ref_logprobs=None if ref_rows is None else ref_rows[s:e],
            relevance=None if relevance is None else relevance[s:e],
        )
        mask = check_select_output(select(stats), (e - s,), rows.device)
        return mask & kept_rows[s:e]

    return row_select


def apply_select(select: SelectFn, stats: TokenStats, kept: torch.Tensor) -> torch.Tensor:
    """The flat keep mask after a global ``select`` rule saw every token's statistics."""
    shape = tuple(stats.keep.shape)
    sel = check_select_output(select(stats), shape, kept.device)
    return kept & sel.reshape(-1)
