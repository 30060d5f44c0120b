"""Gradient filtering (``grad_filter``): the skipped columns, the error bound, the report.

Every filtered gradient is checked against a float64 unfiltered reference with the error the
filter states: ``|dx_i - exact_i| <= scale_i * skipped_i * max_v |W_v|`` per row and
``|dW - exact|_F <= sum_i scale_i * skipped_i * |x_i|`` (``skipped_i`` the |d loss / d logit|
mass the filter reports for row ``i``), on top of the unfiltered same-dtype error.
"""

from __future__ import annotations

import pytest
import torch

import xtf_kernels
from xtf_kernels import masked_ce
from xtf_kernels.grad_filter import GradFilter, as_grad_filter

#: a threshold that skips about 70 % of the columns of the small peaked problem
THR = 3e-3
BACKENDS = [n for n in ("torch", "native", "triton") if xtf_kernels.backend_status()[n][0]]


def peaked(N=96, D=32, V=1500, seed=0, bias=False):
    """Trained-scale logits: a Zipf log-prior shared by every row plus a gold component of
    random strength, so most of each row's mass sits on a few columns (module doc of
    ``benchmarks.masked_ce.shapes.make_inputs``, small)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g) * D**-0.5
    u = torch.randn(D, generator=g)
    u /= u.norm()
    prior = -torch.log1p(torch.randperm(V, generator=g).float())
    y = torch.randint(0, V, (N,), generator=g)
    rows = w[y] - (w[y] @ u)[:, None] * u[None, :]
    w += (prior / 4.0)[:, None] * u[None, :]
    h = 4.0 * u[None, :] + (2.0 + 10.0 * torch.rand(N, 1, generator=g)) * rows / rows.pow(2).sum(1, keepdim=True)
    h += torch.randn(N, D, generator=g) * 0.3
    y[torch.rand(N, generator=g) < 0.15] = -100
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    return h, w, y, b


def _run(h, w, y, b=None, *, backend="torch", reduction="mean", upstream=None, grad_filter=None, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    loss, st = masked_ce(hh, ww, y, bias=bb, backend=backend, reduction=reduction, return_stats=True,
                         grad_filter=grad_filter, **kw)
    (loss * upstream).sum().backward() if upstream is not None else loss.backward()
    return loss.detach(), st, hh.grad, ww.grad, None if bb is None else bb.grad


PATHS = {
    "formed": dict(reduction="mean"),  # gradient formed in the forward (one row chunk)
    "formed-chunks": dict(reduction="sum", chunk=64 * 1500),  # several row chunks
    "recompute": dict(reduction="mean", grad_in_forward=False),  # vocabulary-blocked backward
    "none": dict(reduction="none"),  # per-token upstream: recompute with a row scale
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
def test_filtered_gradient_is_within_the_stated_bound(backend, path):
    opt = dict(PATHS[path])
    chunk = opt.pop("chunk", None)
    gif = opt.pop("grad_in_forward", True)
    h, w, y, _ = peaked()
    up = None
    if opt["reduction"] == "none":
        up = torch.rand(y.shape, generator=torch.Generator().manual_seed(5)) + 0.5
    kept = y != -100
    with xtf_kernels.options(grad_in_forward=gif, **({"chunk_elems": chunk} if chunk else {})):
        ref = _run(h.double(), w.double(), y, backend="torch", upstream=None if up is None else up.double(), **opt)
        unf = _run(h, w, y, backend=backend, upstream=up, **opt)
        got = _run(h, w, y, backend=backend, upstream=up, grad_filter=THR, **opt)
    # the loss and every statistic are exact: the same numbers as without the filter
    assert torch.equal(got[0], unf[0])
    for f in ("logprob", "entropy", "lse", "keep"):
        assert torch.equal(getattr(got[1], f), getattr(unf[1], f), ) or torch.allclose(
            getattr(got[1], f), getattr(unf[1], f), equal_nan=True)
    sk = got[1].grad_skipped
    assert unf[1].grad_skipped is None and sk is not None and sk.shape == y.shape
    assert torch.isnan(sk[~kept]).all() and not torch.isnan(sk[kept]).any()
    assert (sk[kept] >= 0).all() and float(sk[kept].max()) > 1e-3  # the filter did skip mass
    # the stated bound, on top of the unfiltered error
    n_kept = int(kept.sum())
    scale = (up if up is not None else torch.full(y.shape, 1.0 / (n_kept if opt["reduction"] == "mean" else 1)))
    s = (scale * sk.nan_to_num()).double()
    wmax = w.double().norm(dim=1).max()
    err_dx = (got[2].double() - ref[2]).norm(dim=-1)
    base_dx = (unf[2].double() - ref[2]).norm(dim=-1)
    assert (err_dx <= s * wmax + base_dx + 1e-6).all(), float((err_dx - s * wmax - base_dx).max())
    err_dw = (got[3].double() - ref[3]).norm()
    bound_dw = (s * h.double().norm(dim=-1)).sum() + (unf[3].double() - ref[3]).norm() + 1e-6
    assert err_dw <= bound_dw, (float(err_dw), float(bound_dw))
    assert err_dw > (unf[3].double() - ref[3]).norm()  # something was really skipped


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_mass_bound_caps_every_row_and_keeps_the_bias_gradient_exact(backend):
    h, w, y, b = peaked(seed=1, bias=True)
    up = torch.rand(y.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    rule = GradFilter(threshold=THR, max_skipped=5e-2)
    for gif in (True, False):
        with xtf_kernels.options(grad_in_forward=gif):
            unf = _run(h, w, y, b, backend=backend, reduction="none", upstream=up)
            got = _run(h, w, y, b, backend=backend, reduction="none", upstream=up, grad_filter=rule)
        sk = got[1].grad_skipped[y != -100]
        assert float(sk.max()) <= 5e-2 * (1 + 1e-5) and float(sk.max()) > 0
        torch.testing.assert_close(got[4], unf[4], rtol=1e-6, atol=1e-7)  # db: never filtered
    # without the bound the same threshold skips more in some row
    free = _run(h, w, y, b, backend=backend, reduction="none", upstream=up, grad_filter=THR)
    assert float(free[1].grad_skipped.nan_to_num().max()) > 5e-2


def test_zero_threshold_is_the_exact_path_and_options_set_the_default():
    h, w, y, _ = peaked(seed=3)
    exact = _run(h, w, y)
    zero = _run(h, w, y, grad_filter=0.0)
    assert all(torch.equal(a, c) for a, c in zip(exact[2:4], zero[2:4])) and zero[1].grad_skipped is None
    call = _run(h, w, y, grad_filter=THR)
    with xtf_kernels.options(grad_filter=THR):
        opt = _run(h, w, y)
        forced = _run(h, w, y, grad_filter=0.0)  # the call's own value wins
    assert torch.equal(opt[2], call[2]) and torch.equal(opt[3], call[3]) and opt[1].grad_skipped is not None
    assert torch.equal(forced[3], exact[3])
    assert not torch.equal(call[3], exact[3])


def test_auto_threshold_follows_the_input_dtype():
    assert GradFilter().resolve(torch.bfloat16) == (2.0**-7 / 32, None)
    assert GradFilter().resolve(torch.float16) == (2.0**-10 / 32, None)
    assert GradFilter(max_skipped="auto").resolve(torch.float32) == (2.0**-23 / 32, 2.0**-23)
    assert GradFilter(threshold=0.0).resolve(torch.float32) is None
    assert as_grad_filter("auto") == GradFilter() and as_grad_filter(1e-4) == GradFilter(threshold=1e-4)
    assert as_grad_filter(None) is None


@pytest.mark.parametrize("bad", ["fast", -1.0, float("nan"), float("inf"), True, [1e-3]])
def test_bad_grad_filter_is_refused_with_its_name(bad):
    h, w, y, _ = peaked(N=8, V=50)
    with pytest.raises(ValueError, match="grad_filter"):
        masked_ce(h, w, y, grad_filter=bad)


@pytest.mark.parametrize("kw", [dict(threshold=-1.0), dict(threshold="x"), dict(max_skipped=-0.1),
                                dict(max_skipped="none"), dict(threshold=float("inf"))])
def test_bad_grad_filter_fields_are_refused(kw):
    with pytest.raises(ValueError, match="GradFilter"):
        GradFilter(**kw)


def test_filtered_gradient_under_torch_compile_matches_eager():
    h, w, y, _ = peaked(seed=4)

    def step(hh, ww):
        return masked_ce(hh, ww, y, backend="torch", grad_filter=THR)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = compiled(hh, ww)
    loss.backward()
    with xtf_kernels.options(grad_in_forward=False):  # the custom op always recomputes
        ref = _run(h, w, y, grad_filter=THR)
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(hh.grad, ref[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ww.grad, ref[3], rtol=1e-5, atol=1e-7)
    exact = _run(h, w, y)
    assert not torch.allclose(ww.grad, exact[3], rtol=1e-6, atol=1e-9)  # the filter ran in the graph


@pytest.mark.parametrize("backend", BACKENDS)
def test_rowwise_select_filters_the_rows_it_keeps(backend):
    h, w, y, _ = peaked(seed=6)
    sel = xtf_kernels.rowwise(lambda s: s.logprob < -0.3)
    unf = _run(h, w, y, backend=backend, select=sel)
    got = _run(h, w, y, backend=backend, select=sel, grad_filter=THR)
    kept = got[1].keep
    assert torch.equal(kept, unf[1].keep) and 0 < int(kept.sum()) < int((y != -100).sum())
    sk = got[1].grad_skipped
    assert torch.isnan(sk[~kept]).all() and float(sk[kept].max()) > 1e-3
    s = (sk.nan_to_num() / int(kept.sum())).double()
    err = (got[2].double() - unf[2].double()).norm(dim=-1)
    assert (err <= s * w.double().norm(dim=1).max() + 1e-5).all()


def test_a_nan_row_propagates_as_without_the_filter():
    h, w, y, _ = peaked(seed=7)
    h[3] = float("nan")
    y[3] = 5
    unf = _run(h, w, y, reduction="sum")
    got = _run(h, w, y, reduction="sum", grad_filter=THR)
    assert torch.isnan(unf[0]) and torch.isnan(got[0])
    assert torch.equal(torch.isnan(got[2]), torch.isnan(unf[2]))
    assert torch.equal(torch.isnan(got[3]), torch.isnan(unf[3]))
