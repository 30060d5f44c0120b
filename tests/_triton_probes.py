"""Test-only Triton kernels that run the backend's ``@triton.jit`` helpers on their own.

They live with the tests (the package ships no test hooks): each probe calls one helper of
:mod:`xtf_kernels.backends._triton.kernels` and stores its result. Import this module only
where Triton is importable.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xtf_kernels.backends._triton import kernels as K

_row_offset = K.row_offset
_softcap = K._softcap


@triton.jit
def _row_offset_probe(OUT, ROWS, stride, N: tl.constexpr):
    r = tl.load(ROWS + tl.arange(0, N))
    tl.store(OUT + tl.arange(0, N), _row_offset(r, stride))


@triton.jit
def _softcap_probe(OUT, X, cap, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(OUT + offs, _softcap(tl.load(X + offs, mask=mask, other=0.0), cap), mask=mask)


def row_offsets(rows: torch.Tensor, stride: int) -> torch.Tensor:
    """``rows * stride`` (int64) through the kernels' ``row_offset``; ``rows``: int32 ``[N]``,
    ``N`` a power of two >= 16."""
    n = rows.numel()
    assert rows.dtype == torch.int32 and n >= 16 and n & (n - 1) == 0
    out = torch.empty(n, dtype=torch.int64, device=rows.device)
    _row_offset_probe[(1,)](out, rows, stride, N=n)
    return out


def softcap_values(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` elementwise through the kernels' softcap (contiguous fp32 ``x``)."""
    assert x.dtype == torch.float32 and x.is_contiguous() and cap > 0
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _softcap_probe[(math.ceil(n / 1024),)](out, x, float(cap), n, BLOCK=1024)
    return out
