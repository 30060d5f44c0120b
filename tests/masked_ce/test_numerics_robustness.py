"""Numerics that peers' test suites catch (issue 10, items 1-7): every backend, float64 oracle.

Criterion, as in test_masked_ce.py: |ref - ours| <= |ref - same-dtype PyTorch| + tol,
elementwise; where a fix must beat same-dtype PyTorch, a stricter bound is stated.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xtf_kernels
from tests._reference import reference_masked_ce
from tests.conftest import DEVICE
from tests.masked_ce.test_masked_ce import TOL, assert_close_crit, dtypes_for
from xtf_kernels import masked_ce
from xtf_kernels.backends import load_backend


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_()


def check_against_oracle(backend, h, w, y, *, bias=None, reduction="mean", grad_in_forward=True,
                         check_grads=True, chunk_elems=4096, **opts):
    """masked_ce on ``backend`` vs the float64 and same-dtype references: loss, statistics and
    (``check_grads``) gradients of hidden, weight, bias. Returns our (loss, stats)."""
    dtype = h.dtype
    hh, ww, bb = _leaf(h), _leaf(w), _leaf(bias)
    with xtf_kernels.options(grad_in_forward=grad_in_forward, chunk_elems=chunk_elems):
        loss, st = masked_ce(hh, ww, y, bias=bb, reduction=reduction, return_stats=True,
                             backend=backend, **opts)
    params = [p for p in (hh, ww, bb) if p is not None]
    g_up = torch.linspace(-1, 1, loss.numel()).view(loss.shape).to(loss) if reduction == "none" else None
    ours_g = torch.autograd.grad(loss, params, g_up)
    refs = {}
    for tag, dt in (("ref", torch.float64), ("same", dtype)):
        leaves = [_leaf(t.cpu().to(dt) if tag == "ref" else t.cpu()) for t in (h, w, bias) if t is not None]
        rb = leaves[2] if bias is not None else None
        rl, rs = reference_masked_ce(leaves[0], leaves[1], y.cpu(), bias=rb, reduction=reduction,
                                     dtype=dt, **opts)
        gu = None if g_up is None else g_up.cpu().to(rl.dtype)
        try:
            rg = torch.autograd.grad(rl, leaves, gu)
        except RuntimeError:  # some fp16 ops lack a CPU autograd kernel
            rg = [torch.zeros_like(t) for t in leaves]
        refs[tag] = (rl, rs, rg)
    (rl, rs, rg), (sl, ss, sg) = refs["ref"], refs["same"]
    assert_close_crit("loss", loss, rl, sl, dtype)
    for f in ("logprob", "prob", "entropy", "lse"):
        assert_close_crit(f, getattr(st, f), rs[f], ss[f], dtype)
    for name, go, gr, gs in zip(("d_hidden", "d_weight", "d_bias"), ours_g, rg, sg):
        if check_grads:
            assert_close_crit(name, go, gr, gs, dtype)
    return loss, st


def _problem(N=24, D=16, V=300, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * 0.5).to(dtype).to(device)
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(dtype).to(device)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    return h, w, y


# --------------------------------------------------------------- 1. large common logit offset
@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_offset_two_equal_logits_is_log2(backend, device, offset):
    """All logits equal to a huge offset: loss and -logprob are log 2 exactly, as
    F.cross_entropy gives at every offset (the fp32 lse alone cannot hold log 2 there)."""
    h = torch.zeros(1, 4, device=device, requires_grad=True)
    w = torch.zeros(2, 4, device=device)
    b = torch.full((2,), offset, device=device, requires_grad=True)
    loss, st = masked_ce(h, w, torch.tensor([0], device=device), bias=b, return_stats=True,
                         backend=backend)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert st.logprob.item() == pytest.approx(-math.log(2), abs=1e-7)
    assert st.lse.item() == pytest.approx(offset + math.log(2), rel=1e-7)  # fp32: nearest to it
    (gb,) = torch.autograd.grad(loss, [b])
    torch.testing.assert_close(gb.cpu(), torch.tensor([-0.5, 0.5]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("reduction,grad_in_forward", [("mean", True), ("mean", False), ("none", True)])
def test_offset_3e4_meets_the_oracle(backend, device, reduction, grad_in_forward):
    """N(0, 1)-scale logits plus a common offset of 3e4 (through the bias): loss, logprob and
    gradients as precise as same-dtype PyTorch, on every gradient path."""
    h, w, y = _problem(device=device, N=24, D=16, V=300)
    bias = torch.full((300,), 3e4, device=device) + torch.randn(300, generator=torch.Generator().manual_seed(1)).to(device)
    check_against_oracle(backend, h, w, y, bias=bias, reduction=reduction, grad_in_forward=grad_in_forward)


def test_offset_through_the_gemm_keeps_logprob_precise(backend, device):
    """A common offset of 3e4 produced by the GEMM itself. Inputs are small dyadic numbers, so
    every logit (3e4 + a multiple of 1/64) is exact in fp32 whatever the GEMM's summation
    order (CPU, cuBLAS, tl.dot): what is left is the CE's own precision. The log-probability
    (small) must keep it instead of inheriting the fp32 rounding of the lse (~1e-3)."""
    g = torch.Generator().manual_seed(2)
    h = (torch.randn(16, 16, generator=g) * 4).round().clamp(-8, 8) / 4
    w = (torch.randn(200, 16, generator=g) * 4).round().clamp(-8, 8) / 16
    h = torch.cat([h, torch.ones(16, 1)], 1).to(device)
    w = torch.cat([w, torch.full((200, 1), 3e4)], 1).to(device)
    y = torch.randint(0, 200, (16,), generator=g).to(device)
    # (gradients not compared: d_hidden of the offset column is 3e4 * sum(softmax - onehot),
    # pure cancellation whose fp32 rounding is random in every implementation)
    _, st = check_against_oracle(backend, h, w, y, check_grads=False)
    z = h.cpu().double() @ w.cpu().double().t()
    lp = z.gather(1, y.cpu()[:, None])[:, 0] - torch.logsumexp(z, 1)
    assert (st.logprob.cpu().double() - lp).abs().max().item() < 1e-5  # fp32 lse rounding: ~1e-3


# --------------------------------------------------------------- 2. entropy with -inf logits
def test_entropy_with_minus_inf_logits(backend, device):
    """Vocabulary masking through a -inf bias: entropy uses 0 log 0 = 0 (no NaN); loss,
    statistics and gradients meet the oracle."""
    for dtype in dtypes_for(backend, device):
        h, w, y = _problem(device=device, N=20, D=16, V=300, dtype=dtype, seed=3)
        bias = torch.zeros(300, dtype=dtype, device=device)
        bias[100:] = float("-inf")
        y = y % 100  # gold tokens in the allowed part
        _, st = check_against_oracle(backend, h, w, y, bias=bias)
        assert torch.isfinite(st.entropy).all()
        assert (st.entropy <= math.log(100) + 1e-3).all()


# --------------------------------------------------------------- 3. double backward
@pytest.mark.parametrize("reduction,grad_in_forward", [("mean", True), ("none", True), ("mean", False)])
def test_double_backward_is_refused_clearly(backend, device, reduction, grad_in_forward):
    h, w, y = _problem(device=device, N=6, D=8, V=11)
    h.requires_grad_()
    with xtf_kernels.options(grad_in_forward=grad_in_forward):
        out = masked_ce(h, w, y, reduction=reduction, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="masked_ce: second-order gradients are not supported"):
        g.pow(2).sum().backward()


def test_double_backward_is_refused_on_the_compiled_path():
    from xtf_kernels.loss.custom_op import compiled_masked_ce
    from xtf_kernels.ops import MaskedCESpec

    h, w, y = _problem(N=6, D=8, V=11)
    h.requires_grad_()
    outs = compiled_masked_ce(hidden=h, weight=w, labels=y, bias=None, keep=None, ref_logprobs=None,
                              task_vector=None, num_items=None,
                              spec=MaskedCESpec(backend="torch").resolved())
    (g,) = torch.autograd.grad(outs.loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="masked_ce: second-order gradients are not supported"):
        g.pow(2).sum().backward()


def test_create_graph_first_order_gradient_is_still_right(backend, device):
    h, w, y = _problem(device=device, N=6, D=8, V=11)
    grads = []
    for create_graph in (False, True):
        hh, ww = _leaf(h), _leaf(w)
        masked_ce(hh, ww, y, backend=backend).backward(create_graph=create_graph)
        grads.append((hh.grad.detach(), ww.grad.detach()))
    torch.testing.assert_close(grads[0], grads[1])


# --------------------------------------------------------------- 4. half precision epilogue
@pytest.mark.parametrize("opts", [{"softcap": 3.0}, {"label_smoothing": 0.1}], ids=["bias+softcap", "bias"])
def test_half_bias_softcap_keep_fp32_logits(backend, device, opts):
    """fp16 / bf16 with a bias or softcap: Triton (and torch on CUDA) keep the GEMM accumulator
    fp32 through the epilogue, so lse / logprob are fp32-accurate (rounding the GEMM output to
    the input dtype first costs ~1e-3 here). The CPU backends (native, torch) round first (no
    fast bf16 GEMM with an fp32 result on the CPU; docs/numerics.md): they meet the oracle."""
    for dtype in [d for d in dtypes_for(backend, device) if d != torch.float32]:
        h, w, y = _problem(device=device, N=24, D=64, V=500, dtype=dtype, seed=4)
        h = h * 4
        bias = (torch.randn(500, generator=torch.Generator().manual_seed(5)) * 2).to(dtype).to(device)
        _, rs = reference_masked_ce(h.cpu().double(), w.cpu().double(), y.cpu(), bias=bias.cpu().double(), **opts)
        # small chunks: statistics from the fused / chunked sweep; large: the gradient rows'
        # statistics from the logits buffer of the one-chunk gradient path
        for grad_in_forward, chunk in ((True, 4096), (False, 4096), (True, 1 << 16)):
            _, st = check_against_oracle(backend, h, w, y, bias=bias, grad_in_forward=grad_in_forward,
                                         chunk_elems=chunk, **opts)
            if backend != "triton" and device == "cpu":
                continue
            for f in ("lse", "logprob"):
                err = (getattr(st, f).cpu().double() - rs[f]).abs().max().item()
                assert err < 2e-5, f"{dtype} {f}: error {err:.2e} against float64 (fp32 logits expected)"


# --------------------------------------------------------------- 5. softcap accuracy
def _softcap_points():
    t = torch.cat([torch.logspace(-7, 1.3, 4001), -torch.logspace(-7, 1.3, 401), torch.zeros(1)])
    return t


@pytest.mark.parametrize("impl", ["native", "triton"])
def test_softcap_is_accurate_for_small_arguments(impl):
    """c * tanh(x / c) as the kernels evaluate it: relative error within ~2 ulp of fp32 over
    |x / c| in [1e-7, 20] (1 - 2 / (exp(2t) + 1) alone loses everything at t = 1e-7)."""
    if impl == "native":
        if not xtf_kernels.backend_status()["native"][0]:
            pytest.skip("native backend unavailable")
        from xtf_kernels._native_build import load_native

        fn = load_native().softcap_values
        dev = "cpu"
    else:
        if not xtf_kernels.backend_status()["triton"][0]:
            pytest.skip("triton backend unavailable")
        from tests._triton_probes import softcap_values as fn

        dev = DEVICE
    for c in (1.0, 30.0):
        x = (_softcap_points() * c).float()
        ref = c * torch.tanh(x.double() / c)
        ours = fn(x.to(dev), c).cpu().double()
        torch_fp32 = (c * torch.tanh(x / c)).double()
        assert ours[-1].item() == 0.0
        bound = (torch_fp32 - ref).abs() + 2.5e-7 * ref.abs()
        excess = ((ours - ref).abs() - bound).max().item()
        assert excess <= 0, f"c={c}: softcap error exceeds torch fp32 + 2 ulp by {excess:.2e}"


def test_softcap_small_arguments_through_masked_ce(backend, device):
    """A large softcap (|logit / c| ~ 1e-3): statistics and gradients meet the oracle, and
    lse / logprob are fp32-accurate (the cancelling form was off by ~1e-5 to 1e-4 here)."""
    h, w, y = _problem(device=device, N=16, D=16, V=300, seed=6)
    for chunk in (4096, 1 << 16):
        _, st = check_against_oracle(backend, h, w, y, softcap=1000.0, chunk_elems=chunk)
        _, rs = reference_masked_ce(h.cpu().double(), w.cpu().double(), y.cpu(), softcap=1000.0)
        for f in ("lse", "logprob"):
            err = (getattr(st, f).cpu().double() - rs[f]).abs().max().item()
            assert err < 2e-6, f"{f}: error {err:.2e} against float64"


# --------------------------------------------------------------- 6. integer label dtypes
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_any_integer_label_dtype(backend, device, dtype):
    h, w, y = _problem(device=device, N=12, D=8, V=100)
    y[::5] = -100 if dtype != torch.uint8 else 99
    ignore = -100 if dtype != torch.uint8 else 99
    ref = masked_ce(h, w, y, ignore_index=ignore, backend=backend, return_stats=True)
    ours = masked_ce(h, w, y.to(dtype), ignore_index=ignore, backend=backend, return_stats=True)
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1].logprob, ref[1].logprob, equal_nan=True)


# --------------------------------------------------------------- 7. autocast
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_matches_eager_hugging_face(backend, device, bias):
    """Under torch.autocast every backend does what eager HF does: the GEMM operands cast to
    the autocast dtype, fp32 accumulation, then an fp32 loss; gradients come back fp32. On the
    CPU the half GEMMs run in fp32 (XTF_CPU_HALF_GEMM, docs/numerics.md): there the reference
    is eager code on the cast operands with an fp32 GEMM."""
    from xtf_kernels._env import cpu_half_gemm

    be = load_backend(backend)
    dt = torch.bfloat16 if be.supports(torch.device(device), torch.bfloat16)[0] else torch.float16
    fp32_gemm = device == "cpu" and backend != "triton" and cpu_half_gemm() == "fp32"
    h, w, y = _problem(device=device, N=32, D=32, V=300, seed=7)
    b = torch.randn(300, generator=torch.Generator().manual_seed(8)).to(device) if bias else None
    out = []
    for fused in (False, True):
        hh, ww, bb = _leaf(h), _leaf(w), _leaf(b)
        if fused:
            with torch.autocast(device, dtype=dt):
                loss = masked_ce(hh, ww, y, bias=bb, backend=backend)
        elif fp32_gemm:
            up = [None if t is None else t.to(dt).float() for t in (hh, ww, bb)]
            loss = F.cross_entropy(F.linear(*up), y)
        else:
            with torch.autocast(device, dtype=dt):
                loss = F.cross_entropy(F.linear(hh, ww, bb).float(), y)
        loss.backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    (l_ref, gh_ref, gw_ref), (l, gh, gw) = out
    assert l.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    # with a bias, eager rounds (GEMM + bias) to dt once more than our fp32 epilogue does
    atol, rtol = (1e-6, 1e-6) if (not bias or fp32_gemm) else TOL[dt]
    # the gradients are rounded to dt on both sides (the casts' backward): one ulp of dt apart
    # where fp32 sums in another order land on the other side of a rounding boundary
    grtol = max(rtol, 1e-3) if not fp32_gemm else torch.finfo(dt).eps
    torch.testing.assert_close(l, l_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gh, gh_ref, atol=atol + 1e-5, rtol=grtol)
    torch.testing.assert_close(gw, gw_ref, atol=atol + 1e-5, rtol=grtol)
