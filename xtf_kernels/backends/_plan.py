"""The one chunk plan of every backend: how many logits a chunk holds, and how rows and
vocabulary columns are cut.

``CEConfig.chunk_elems`` counts fp32 logits (:data:`~xtf_kernels.config.DEFAULT_CHUNK_ELEMS`):
a backend whose logits have another dtype (bf16 in the native backend, fp64 under gradcheck)
holds as many as fit in those bytes (:func:`budget_elems`). Row sweeps over the full
vocabulary take :func:`rows_per_chunk` rows; recomputes take :func:`vocab_blocks` blocks whose
widths are multiples of 128 (16-byte aligned leading dimensions for cuBLAS' tensor cores).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # base imports this module's functions
    from .base import CEConfig

#: vocabulary blocks are multiples of this many columns
VOCAB_ALIGN = 128


def budget_elems(cfg: CEConfig, dtype: torch.dtype) -> int:
    """Logits elements of ``dtype`` one chunk holds: the bytes of ``cfg.chunk_elems`` fp32
    elements (at least 1)."""
    return max(1, cfg.chunk_elems * 4 // dtype.itemsize)


def rows_per_chunk(n: int, cols: int, cfg: CEConfig, dtype: torch.dtype) -> int:
    """Rows of ``cols`` logits in ``dtype`` per chunk, in ``[1, max(n, 1)]``: the fewest chunks
    the budget allows, all of this size but the last, which is smaller by less than the number
    of chunks (3277 rows under a 524-row budget: 6 chunks of 469 and one of 463, not 6 of 524 and
    one of 133; the buffer is no larger than the chunks need)."""
    cap = max(1, min(n, budget_elems(cfg, dtype) // max(cols, 1)))
    if n <= cap:
        return max(n, 1)
    chunks = -(-n // cap)
    return -(-n // chunks)


def spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of ``size`` over ``range(n)``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def vocab_blocks(n: int, V: int, cfg: CEConfig, dtype: torch.dtype) -> tuple[int, int]:
    """``(rc, vb)``: blocks of ``rc`` of the ``n`` rows x ``vb`` of the ``V`` columns whose
    ``dtype`` logits fit the budget.

    All rows in each block when a block of at least ``min(V, 256)`` columns can hold them
    (then dW of a block is formed by one GEMM and written once); otherwise square-ish blocks
    (every block re-reads and writes fp32 slices of dx and dW: square blocks minimise that
    traffic). Widths are multiples of :data:`VOCAB_ALIGN` (at least one), capped at ``V``.
    """
    budget = budget_elems(cfg, dtype)
    n = max(n, 1)
    if budget // n >= min(V, 256):
        rc = n
    else:
        rc = min(n, max(math.isqrt(budget), -(-budget // V)))
    vb = min(V, max(VOCAB_ALIGN, budget // rc // VOCAB_ALIGN * VOCAB_ALIGN))
    return rc, vb
