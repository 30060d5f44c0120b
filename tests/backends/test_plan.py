"""The one chunk plan of every backend (``backends/_plan.py``, issue 19 item 1): one budget
meaning and one vocabulary-block formula."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from xtf_kernels.backends import CEConfig
from xtf_kernels.backends._plan import (
    VOCAB_ALIGN,
    budget_elems,
    rows_per_chunk,
    spans,
    vocab_blocks,
)

BACKENDS = Path(__file__).resolve().parents[2] / "xtf_kernels" / "backends"


def test_the_budget_is_the_bytes_of_chunk_elems_fp32_logits():
    cfg = CEConfig(chunk_elems=1000)
    assert budget_elems(cfg, torch.float32) == 1000
    assert budget_elems(cfg, torch.bfloat16) == budget_elems(cfg, torch.float16) == 2000
    assert budget_elems(cfg, torch.float64) == 500
    assert rows_per_chunk(50, 64, cfg, torch.float32) == 13  # 4 chunks (15 fit): 13, 13, 13, 11
    assert rows_per_chunk(5, 64, cfg, torch.float32) == 5
    assert rows_per_chunk(0, 64, cfg, torch.float32) == 1
    assert rows_per_chunk(50, 10**6, cfg, torch.float32) == 1


@pytest.mark.parametrize("n", [1, 7, 300, 5000, 100_000])
@pytest.mark.parametrize("V", [50, 1000, 32000, 128256])
@pytest.mark.parametrize("chunk", [256, 1 << 16, 1 << 24])
def test_vocab_blocks_are_aligned_and_fit(n, V, chunk):
    cfg = CEConfig(chunk_elems=chunk)
    rc, vb = vocab_blocks(n, V, cfg, torch.float32)
    assert 1 <= rc <= n and 1 <= vb <= V
    assert vb == V or vb % VOCAB_ALIGN == 0
    if vb > VOCAB_ALIGN:
        assert rc * vb <= budget_elems(cfg, torch.float32)
    if budget_elems(cfg, torch.float32) // n >= min(V, 256):
        assert rc == n  # every row in each block: dW[v0:v1] by one GEMM


def test_spans_cover_the_range_once():
    assert list(spans(7, 3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(spans(0, 3)) == []


@pytest.mark.parametrize("module", ["torch_backend.py", "native_backend.py", "triton_backend.py", "base.py"])
def test_backends_chunk_through_the_plan(module):
    """No backend writes its own ``range(0, n, step)`` chunk loop or budget arithmetic."""
    tree = ast.parse((BACKENDS / module).read_text())
    loops = [
        n.lineno for n in ast.walk(tree)
        if isinstance(n, ast.For) and isinstance(n.iter, ast.Call)
        and getattr(n.iter.func, "id", "") == "range" and len(n.iter.args) == 3
    ]
    assert not loops, f"{module}: hand-written chunk loops at lines {loops}; use _plan.spans"
    assert "chunk_elems //" not in (BACKENDS / module).read_text()


@pytest.mark.parametrize("n,cap", [(3277, 524), (50, 15), (7, 3), (100, 16), (5, 5), (1, 1)])
def test_row_chunks_are_the_fewest_and_nearly_equal(n, cap):
    """As many chunks as the budget needs, none fuller than the budget, the last the smallest."""
    cfg = CEConfig(chunk_elems=cap * 64)
    rows = rows_per_chunk(n, 64, cfg, torch.float32)
    sizes = [e - s for s, e in spans(n, rows)]
    assert len(sizes) == -(-n // cap) and max(sizes) <= cap
    assert max(sizes) - min(sizes) < len(sizes)


@pytest.mark.parametrize("budget_rows,native,torch_plan", [(2, (25, 4), (50, 2)), (10, (7, 15), (10, 10))])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_the_native_sweep_holds_up_to_the_dw_accumulator(backend, budget_rows, native, torch_plan, monkeypatch):
    """``chunk_up_to_dw``: the native backend's gradient sweep takes chunks of up to twice
    ``chunk_elems`` logits, no more than V * D (the fp32 [V, D] dW it sums into); the torch
    backend keeps the budget. (chunks, largest chunk) as planned, and the gradient of float64."""
    from xtf_kernels.backends import load_backend

    try:
        be = load_backend(backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    M, D, V = 100, 16, 200  # V * D holds 16 rows
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, D, generator=g), torch.randn(V, D, generator=g) * 0.25
    y = torch.randint(0, V, (M,), generator=g)
    seen = []
    real = type(be).logits_
    monkeypatch.setattr(type(be), "logits_", lambda self, out, *a: (seen.append(out.shape[0]), real(self, out, *a)))
    out = be.forward(x, w, None, y, CEConfig(chunk_elems=budget_rows * V), M)
    assert (len(seen), max(seen)) == (native if backend == "native" else torch_plan)
    z = (x.double() @ w.double().t()).softmax(1)
    z[torch.arange(M), y] -= 1
    torch.testing.assert_close(out.dx.double(), z @ w.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.dw.double(), z.t() @ x.double(), rtol=1e-5, atol=1e-5)
