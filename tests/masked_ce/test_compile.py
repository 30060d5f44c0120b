"""masked_ce inside torch.compile: the custom ops pass opcheck and a fullgraph step matches eager."""

from __future__ import annotations

import pytest
import torch

from xtf_kernels import masked_ce
from xtf_kernels.masked_ce import custom_op


def test_custom_op_opcheck():
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(3, 5, 8, generator=g, requires_grad=True),
        torch.randn(11, 8, generator=g, requires_grad=True),
        torch.randint(0, 11, (3, 5), generator=g),
        torch.randn(11, generator=g, requires_grad=True),
        torch.rand(3, 5, generator=g) > 0.3,
        None, None, None, -100, "mean", 0.1, 1e-3, 4.0, False, "torch", 1 << 24, True,
    )
    # (no ignored positions: NaN statistics would compare unequal to themselves)
    res = torch.library.opcheck(custom_op.masked_ce_fwd, args)
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiled_training_step_matches_eager(reduction):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    w = torch.nn.Parameter(torch.randn(50, 16) * 0.1)
    b = torch.nn.Parameter(torch.randn(50) * 0.1)

    def step(x, y, keep):
        h = lin(x)
        loss, stats = masked_ce(h, w, y, bias=b, keep=keep, shift=True, reduction=reduction,
                                num_items=9, return_stats=True, backend="torch")
        return loss.sum(), stats.entropy

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: fails on any graph break
    x = torch.randn(4, 7, 16)
    y = torch.randint(0, 50, (4, 7))
    y[0, 3] = -100
    keep = torch.rand(4, 7) > 0.3
    results = []
    for fn in (step, compiled):
        loss, ent = fn(x, y, keep)
        loss.backward()
        results.append((loss.detach(), ent, [p.grad.clone() for p in (w, b, lin.weight)]))
        for p in (w, b, lin.weight, lin.bias):
            p.grad = None
    (l1, e1, g1), (l2, e2, g2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(e1, e2, equal_nan=True)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)
