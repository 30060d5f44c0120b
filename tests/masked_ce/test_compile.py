"""masked_ce inside torch.compile: the custom ops pass opcheck; forward + loss compile as one
``fullgraph=True`` graph whose loss, gradients (backward outside the compiled function) and
SGD step match eager (the README's torch.compile paragraph)."""

from __future__ import annotations

import pytest
import torch

from xtf_kernels import masked_ce
from xtf_kernels.loss import custom_op


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
def test_compiled_forward_and_loss_match_eager(reduction):
    """What the README claims: forward + ``masked_ce`` compile as one ``fullgraph=True`` graph.

    The training step is the usual one: the compiled function returns the loss, and
    ``loss.backward()`` runs outside it (PyTorch's Dynamo does not trace ``Tensor.backward()``
    by default: inside a ``fullgraph=True`` function it is an error), through the compiled
    backward graph (the ``masked_ce_bwd`` custom op). Loss, statistics, every gradient and
    the parameters after an SGD step equal the eager step's.
    """
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    w = torch.nn.Parameter(torch.randn(50, 16) * 0.1)
    b = torch.nn.Parameter(torch.randn(50) * 0.1)
    params = (w, b, lin.weight, lin.bias)
    start = [p.detach().clone() for p in params]

    def forward_and_loss(x, y, keep):
        h = lin(x)
        loss, stats = masked_ce(h, w, y, bias=b, keep=keep, shift=True, reduction=reduction,
                                num_items=9, return_stats=True, backend="torch")
        return loss.sum(), stats.entropy

    compiled = torch.compile(forward_and_loss, fullgraph=True)  # fullgraph: fails on any graph break
    x = torch.randn(4, 7, 16)
    y = torch.randint(0, 50, (4, 7))
    y[0, 3] = -100
    keep = torch.rand(4, 7) > 0.3
    results = []
    for fn in (forward_and_loss, compiled):
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        opt = torch.optim.SGD(params, lr=0.5)
        opt.zero_grad(set_to_none=True)
        loss, ent = fn(x, y, keep)
        loss.backward()  # outside the compiled function
        grads = [p.grad.clone() for p in params]
        opt.step()
        results.append((loss.detach(), ent, grads, [p.detach().clone() for p in params]))
    (l1, e1, g1, p1), (l2, e2, g2, p2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(e1, e2, equal_nan=True)
    assert all(g.abs().sum() > 0 for g in g1)  # every parameter is trained
    for a, c in zip(g1 + p1, g2 + p2):
        torch.testing.assert_close(a, c)


def test_compiled_graph_holds_the_custom_ops():
    """Inside ``torch.compile`` the loss is the ``xtf_kernels::masked_ce_fwd`` op, one graph, no break."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    w = torch.nn.Parameter(torch.randn(20, 8))

    def forward_and_loss(h, y):
        return masked_ce(torch.tanh(h), w, y, shift=True, backend="torch")

    h = torch.randn(2, 5, 8, requires_grad=True)
    y = torch.randint(0, 20, (2, 5))
    loss = torch.compile(forward_and_loss, fullgraph=True, backend=record)(h, y)
    loss.backward()
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("masked_ce_fwd" in t for t in targets), targets
    torch.testing.assert_close(loss, masked_ce(torch.tanh(h), w, y, shift=True, backend="torch"))


def test_custom_op_arguments_follow_the_spec():
    """The ops' option arguments are the spec's OP_FIELDS / BWD_OP_FIELDS, in that order: the
    front end passes ``spec.op_args()`` and the autograd glue unpacks by these names."""
    from xtf_kernels.loss.spec import BWD_OP_FIELDS, OP_FIELDS, MaskedCESpec

    fwd = [a.name for a in torch.ops.xtf_kernels.masked_ce_fwd.default._schema.arguments]
    bwd = [a.name for a in torch.ops.xtf_kernels.masked_ce_bwd.default._schema.arguments]
    assert tuple(fwd[8:]) == OP_FIELDS
    assert tuple(bwd[-len(BWD_OP_FIELDS):]) == BWD_OP_FIELDS
    assert set(BWD_OP_FIELDS) <= set(OP_FIELDS)
    assert list(MaskedCESpec().resolved().op_args()) == list(OP_FIELDS)
