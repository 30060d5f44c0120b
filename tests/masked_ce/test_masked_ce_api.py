"""masked_ce: bad input, gradcheck, property tests and the no-[N, V]-logits memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xtf_kernels
from tests._reference import reference_masked_ce
from xtf_kernels import masked_ce


def _inputs(N=6, D=8, V=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(N, D, generator=g, dtype=dtype),
        torch.randn(V, D, generator=g, dtype=dtype),
        torch.randint(0, V, (N,), generator=g),
    )


h, w, y = _inputs()

BAD = [
    # (kwargs / positional overrides, exception type, substring of the message)
    (dict(hidden=h[:5]), ValueError, "labels: expected shape (5,)"),
    (dict(weight=w[0]), ValueError, "weight: expected a 2-D"),
    (dict(weight=torch.randn(11, 7)), ValueError, "weight: expected D = hidden.shape[-1] = 8"),
    (dict(weight=w.double()), TypeError, "weight: expected dtype torch.float32"),
    (dict(bias=torch.zeros(11, dtype=torch.float64)), TypeError, "bias: expected dtype"),
    (dict(bias=torch.zeros(10)), ValueError, "bias: expected shape (11,)"),
    (dict(labels=y.float()), TypeError, "labels: expected an integer dtype"),
    (dict(labels=torch.tensor([0, 1, 2, 11, 0, 0])), ValueError, "labels: expected values in [0, 11)"),
    (dict(labels=torch.tensor([0, 1, 2, -5, 0, 0])), ValueError, "labels: expected values in [0, 11)"),
    (dict(keep=torch.ones(6)), TypeError, "keep: expected a bool tensor"),
    (dict(keep=torch.ones(5, dtype=torch.bool)), ValueError, "keep: expected shape (6,)"),
    (dict(ref_logprobs=torch.zeros(5)), ValueError, "ref_logprobs: expected shape (6,)"),
    (dict(ref_logprobs=torch.zeros(6, dtype=torch.long)), TypeError, "ref_logprobs: expected a floating"),
    (dict(task_vector=torch.zeros(7)), ValueError, "task_vector: expected shape (8,)"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    (dict(backend="cuda"), ValueError, "backend: expected one of"),
    (dict(softcap=0.0), ValueError, "softcap: expected a positive float"),
    (dict(softcap=-1.0), ValueError, "softcap: expected a positive float"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing: expected a value in [0, 1)"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing: expected a value in [0, 1)"),
    (dict(z_loss=-1.0), ValueError, "z_loss: expected a value >= 0"),
    (dict(num_items=-1), ValueError, "num_items: expected >= 0"),
    (dict(num_items=torch.tensor(-2)), ValueError, "num_items: expected >= 0"),
    (dict(num_items=0), ValueError, "num_items: 0 while 6 tokens are kept"),
    (dict(num_items=torch.tensor(0)), ValueError, "num_items: 0 while 6 tokens are kept"),
    (dict(num_items=torch.ones(2)), ValueError, "num_items: expected an int or a 0-d tensor"),
    (dict(num_items=0.5), ValueError, "num_items: expected a whole number of tokens, got 0.5"),
    (dict(num_items=float("nan")), ValueError, "num_items: expected a whole number of tokens"),
    (dict(num_items=torch.tensor(2.5)), ValueError, "got 2.5"),
    (dict(num_items=torch.tensor(True)), TypeError, "num_items: expected an integer or float tensor"),
    (dict(num_items="6"), TypeError, "num_items: expected an int or a 0-d tensor"),
    (dict(hidden=torch.zeros(6, 0), weight=torch.zeros(11, 0)), ValueError,
     "hidden: expected a feature dimension D >= 1 (shape [..., D]), got shape (6, 0)"),
    (dict(hidden=h.long()), TypeError, "hidden: expected a floating dtype"),
    (dict(hidden=[1.0]), TypeError, "hidden: expected a torch.Tensor"),
    (dict(select=3), TypeError, "select: expected a callable"),
    (dict(select=lambda s: s.prob), TypeError, "select: expected it to return a bool tensor"),
    (dict(select=lambda s: s.keep[:3]), ValueError, "select: expected it to return shape (6,)"),
    (dict(select=lambda s: None), TypeError, "select: expected it to return a bool tensor"),
    (dict(shift="yes"), TypeError, "shift: expected a bool"),
    (dict(ignore_index=1.5), TypeError, "ignore_index: expected an int"),
]


@pytest.mark.parametrize("override,exc,msg", BAD, ids=[f"{i}-{list(b[0])[0]}" for i, b in enumerate(BAD)])
def test_bad_input_messages(override, exc, msg):
    args = {"hidden": h, "weight": w, "labels": y}
    kwargs = {"backend": "torch"}
    kwargs.update({k: v for k, v in override.items() if k not in args})
    args.update({k: v for k, v in override.items() if k in args})
    with pytest.raises(exc) as info:
        masked_ce(args["hidden"], args["weight"], args["labels"], **kwargs)
    assert msg in str(info.value), str(info.value)


def test_device_mismatch_message():
    meta = torch.empty(11, 8, device="meta")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        masked_ce(h, meta, y)


def test_unavailable_backend_is_clear():
    status = xtf_kernels.backend_status()
    for name, (ok, _why) in status.items():
        if not ok:
            with pytest.raises(RuntimeError, match=f"backend='{name}' is not available here"):
                masked_ce(h, w, y, backend=name)


@pytest.mark.parametrize("n", [6, 6.0, torch.tensor(6), torch.tensor(6.0), torch.tensor(6, dtype=torch.int32)])
def test_num_items_whole_numbers_in_any_form(n):
    """ints, whole floats and integer-valued tensors of any dtype (the compiled path passes a
    float tensor) are the same divisor."""
    ref = masked_ce(h, w, y, reduction="sum", backend="torch") / 6
    torch.testing.assert_close(masked_ce(h, w, y, num_items=n, backend="torch"), ref)


def test_num_items_may_be_a_count_divided_by_the_world_size(monkeypatch):
    """Under torch.distributed, global_num_items returns count / world (DDP / FSDP average
    gradients over ranks): such divisors pass, other fractions still fail."""
    from xtf_kernels.loss import validate as _validate

    monkeypatch.setattr(_validate, "_world_size", lambda: 2)
    for n in (17.5, 0.5, torch.tensor(35 / 2, dtype=torch.float64), torch.tensor(3.5)):
        masked_ce(h, w, y, num_items=n, backend="torch")
    with pytest.raises(ValueError, match="whole number"):
        masked_ce(h, w, y, num_items=0.3, backend="torch")
    monkeypatch.setattr(_validate, "_world_size", lambda: 3)
    masked_ce(h, w, y, num_items=torch.tensor(35 / 3, dtype=torch.float32), backend="torch")  # fp32 rounding


def test_num_items_zero_with_nothing_kept_is_zero_loss():
    ww = w.clone().requires_grad_()
    loss = masked_ce(h, ww, y, keep=torch.zeros(6, dtype=torch.bool), num_items=0, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(ww.grad) == 0


def test_label_check_can_be_disabled():
    bad = torch.tensor([0, 1, 2, 3, 4, 5])
    with xtf_kernels.options(check_labels=False):
        assert torch.isfinite(masked_ce(h, w, bad, backend="torch"))


def test_repeated_backward_on_grad_in_forward_path_is_a_clear_error():
    ww = w.clone().requires_grad_()
    loss = masked_ce(h, ww, y, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="grad_in_forward=False"):
        loss.backward()
    ww2 = w.clone().requires_grad_()
    with xtf_kernels.options(grad_in_forward=False):
        loss = masked_ce(h, ww2, y, backend="torch")
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(ww2.grad, 2 * ww.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    """gradcheck on the recompute path (gradcheck runs backward repeatedly through one graph,
    which the in-place gradient-in-forward path refuses; that path is checked against the
    float64 reference by the property test and the backend suite)."""
    g = torch.Generator().manual_seed(1)
    hh = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ww = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(13, dtype=torch.float64, generator=g, requires_grad=True)
    yy = torch.randint(0, 13, (2, 5), generator=g)
    yy[0, 2] = -100
    keep = torch.rand(2, 5, generator=g) > 0.2

    def f(a, b, c):
        with xtf_kernels.options(grad_in_forward=False, chunk_elems=40):
            return masked_ce(a, b, yy, bias=c, keep=keep, reduction=reduction, label_smoothing=0.1,
                             z_loss=0.01, softcap=2.0, shift=True, backend="torch")

    assert torch.autograd.gradcheck(f, (hh, ww, bb), eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 20),
    d=st.integers(1, 12),
    v=st.integers(1, 40),
    p_ignore=st.floats(0, 1),
    p_keep=st.floats(0, 1),
    chunk=st.sampled_from([1, 7, 64, 1 << 20]),
    gif=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_masks(n, d, v, p_ignore, p_keep, chunk, gif, seed):
    g = torch.Generator().manual_seed(seed)
    hh = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    ww = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    yy = torch.randint(0, v, (n,), generator=g)
    yy[torch.rand(n, generator=g) < p_ignore] = -100
    keep = torch.rand(n, generator=g) < p_keep
    with xtf_kernels.options(chunk_elems=chunk, grad_in_forward=gif):
        loss, st_ = masked_ce(hh, ww, yy, keep=keep, return_stats=True, backend="torch")
        gh, gw = torch.autograd.grad(loss, [hh, ww])
    rl, rs = reference_masked_ce(hh, ww, yy, keep=keep)
    rgh, rgw = torch.autograd.grad(rl, [hh, ww])
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, rl)
    torch.testing.assert_close(gh, rgh)
    torch.testing.assert_close(gw, rgw)
    torch.testing.assert_close(st_.logprob, rs["logprob"], equal_nan=True)
    assert torch.equal(st_.keep, rs["keep"])


def test_no_full_logits_tensor_is_allocated():
    """Peak RSS of fwd+bwd stays far below one [N, V] fp32 logits tensor (torch backend)."""
    code = textwrap.dedent(
        """
        import json, resource, torch
        from xtf_kernels import masked_ce
        N, D, V = 1024, 16, 100_000          # full fp32 logits would be 410 MB
        h = torch.randn(N, D, requires_grad=True)
        w = torch.randn(V, D, requires_grad=True)
        y = torch.randint(0, V, (N,))
        masked_ce(h[:8], w, y[:8], backend="torch").backward()   # warm-up: allocator, kernels
        w.grad = None; h.grad = None
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss, st = masked_ce(h, w, y, backend="torch", return_stats=True)
        loss.backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"delta_mb": (peak - base) / 1024}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    delta = json.loads(out.stdout.strip().splitlines()[-1])["delta_mb"]
    # chunk_elems=2**24 fp32 = 64 MB per logits buffer (+ softmax temp) and a 6.4 MB fp32 dW;
    # the unchunked logits + their gradient alone would be > 800 MB.
    assert delta < 300, f"peak RSS grew by {delta:.0f} MB"


def test_num_items_fraction_only_as_a_rank_share():
    """num_items must be a whole count; the one fractional divisor accepted is count / world_size
    under torch.distributed (what global_num_items hands every rank)."""
    from xtf_kernels.loss.validate import check_num_items

    with pytest.raises(ValueError, match="whole number"):
        check_num_items(0.5)
    with pytest.raises(ValueError, match="whole number"):
        check_num_items(torch.tensor(17.5, dtype=torch.float64))  # no process group here
    check_num_items(torch.tensor(35.0))


def test_grad_filter_is_exported_from_the_package():
    """``xtf_kernels.GradFilter`` is the class ``masked_ce(grad_filter=...)`` accepts."""
    from xtf_kernels.grad_filter import GradFilter

    assert xtf_kernels.GradFilter is GradFilter and "GradFilter" in xtf_kernels.__all__
    hh, ww, yy = _inputs()
    loss = masked_ce(hh, ww, yy, grad_filter=xtf_kernels.GradFilter(max_skipped=1e-3))
    assert torch.isfinite(loss)
