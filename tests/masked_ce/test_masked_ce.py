"""masked_ce against the float64 unfused reference, for every available backend.

Criterion (as the strongest peers test): |ref - ours| <= |ref - same-dtype PyTorch| + tol,
elementwise, for the loss, every statistic and every gradient.
"""

from __future__ import annotations

import pytest
import torch

import xtf_kernels
from tests._reference import reference_masked_ce
from xtf_kernels import TokenStats, masked_ce
from xtf_kernels.backends import load_backend
from xtf_kernels.backends.base import BackendBase

TOL = {
    torch.float32: (2e-5, 2e-4),  # (atol, rtol)
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (2e-2, 5e-2),
}


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    out = [torch.float32, torch.float16]
    be = load_backend(backend)
    if be.supports(torch.device(device), torch.bfloat16)[0]:
        out.append(torch.bfloat16)
    return [d for d in out if be.supports(torch.device(device), d)[0]]


def assert_close_crit(name, ours, ref, same, dtype):
    atol, rtol = TOL[dtype]
    ours = ours.detach().double().cpu()
    ref = ref.detach().double().cpu()
    same = same.detach().double().cpu()
    nan_ref = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan_ref), f"{name}: NaN pattern differs from the reference"
    ours, ref, same = ours[~nan_ref], ref[~nan_ref], same[~nan_ref]
    if ours.numel() == 0:
        return
    same = torch.nan_to_num(same, nan=0.0, posinf=0.0, neginf=0.0)
    bound = (ref - same).abs() + atol + rtol * ref.abs()
    err = (ref - ours).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: max excess error {worst:.3e} (max err {err.max().item():.3e})"


def make_inputs(N, D, V, dtype, device, *, lead=None, seed=0, ignore_frac=0.2, keep_frac=0.7, bias=False):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (N,)
    n = 1
    for s in shape:
        n *= s
    hidden = (torch.randn(*shape, D, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(V, D, generator=g) * (1.0 / D**0.5)).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    keep = torch.rand(shape, generator=g) < keep_frac
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    ref_lp = -torch.rand(shape, generator=g) * 5
    tv = torch.randn(D, generator=g)
    to = lambda t: None if t is None else t.to(device)
    return to(hidden), to(weight), to(labels), to(b), to(keep), to(ref_lp), to(tv)


def run_case(backend, device, dtype, *, N=37, D=24, V=1000, lead=None, reduction="mean", opts=None,
             use_keep=True, bias=False, grad_in_forward=True, seed=0, num_items=None, select=None,
             stats_args=False):
    opts = opts or {}
    h, w, y, b, keep, ref_lp, tv = make_inputs(N, D, V, dtype, device, lead=lead, seed=seed, bias=bias)
    if not use_keep:
        keep = None
    kwargs = dict(bias=b, keep=keep, reduction=reduction, num_items=num_items, select=select, **opts)
    if stats_args:
        kwargs.update(ref_logprobs=ref_lp, task_vector=tv)

    def leaves(dt):
        ls = [h.detach().to(dt).requires_grad_(), w.detach().to(dt).requires_grad_()]
        ls.append(b.detach().to(dt).requires_grad_() if b is not None else None)
        return ls

    def grads(loss, params, g_up):
        ps = [p for p in params if p is not None]
        gs = torch.autograd.grad(loss, ps, g_up, allow_unused=False)
        return list(gs)

    # ours
    hh, ww, bb = leaves(dtype)
    kw = dict(kwargs, bias=bb)
    with xtf_kernels.options(grad_in_forward=grad_in_forward, chunk_elems=4096):
        loss, stats = masked_ce(hh, ww, y, return_stats=True, backend=backend, **kw)
    g_up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(device) if reduction == "none" else None
    g_ours = grads(loss, [hh, ww, bb], g_up.to(loss.dtype) if g_up is not None else None)

    # float64 reference and same-dtype PyTorch
    out = {}
    for tag, dt in (("ref", torch.float64), ("same", dtype)):
        ph, pw, pb = leaves(dt if tag == "ref" else dtype)
        kw = dict(kwargs, bias=pb)
        if tag == "ref":
            ph, pw = ph.cpu().detach().requires_grad_(), pw.cpu().detach().requires_grad_()
            if pb is not None:
                pb = pb.cpu().detach().requires_grad_()
            kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in dict(kwargs, bias=pb).items()}
            yy = y.cpu()
        else:
            ph, pw = ph.cpu().float().to(dtype).detach().requires_grad_(), pw.cpu().to(dtype).detach().requires_grad_()
            if pb is not None:
                pb = pb.cpu().to(dtype).detach().requires_grad_()
            kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in dict(kwargs, bias=pb).items()}
            yy = y.cpu()
        rl, rs = reference_masked_ce(ph, pw, yy, dtype=dt, **kw)
        gu = None if g_up is None else g_up.cpu().to(rl.dtype)
        try:
            rg = grads(rl, [ph, pw, pb], gu)
        except RuntimeError:  # an op without a CPU kernel in this dtype: see same_dtype_grads
            if tag == "ref":
                raise
            rg = same_dtype_grads(ph, pw, pb, yy, gu, dtype, kw, grads)
        out[tag] = (rl, rs, rg)
    (rl, rs, rg), (sl, ss, sg) = out["ref"], out["same"]
    assert_close_crit("loss", loss, rl, sl, dtype)
    for f in ("logprob", "prob", "entropy", "lse", "logprob_delta", "relevance"):
        ours_f = getattr(stats, f)
        if rs[f] is None:
            assert ours_f is None, f
            continue
        assert_close_crit(f, ours_f, rs[f], ss[f], dtype)
    assert torch.equal(stats.keep.cpu(), rs["keep"]), "keep mask differs"
    for name, go, gr, gs in zip(("d_hidden", "d_weight", "d_bias"), g_ours, rg, sg):
        assert go.dtype == dtype, f"{name}: dtype {go.dtype}"
        assert_close_crit(name, go, gr, gs, dtype)
    return loss, stats


def same_dtype_grads(ph, pw, pb, y, g_up, dtype, kw, grads):
    """Same-dtype baseline gradients where autograd has no kernel for ``dtype`` on this device:
    the reference computed in float32 from the same ``dtype`` inputs, each gradient rounded to
    ``dtype``. Its error is at most the rounding of the result, never more than a same-dtype
    PyTorch run's, so the bound stays tight (the baseline is never zeros)."""
    leaves = [p.detach().float().requires_grad_() if p is not None else None for p in (ph, pw, pb)]
    kw32 = dict(kw, bias=leaves[2])
    loss, _ = reference_masked_ce(leaves[0], leaves[1], y, dtype=torch.float32, **kw32)
    gs = grads(loss, leaves, None if g_up is None else g_up.float())
    return [g.to(dtype) for g in gs]


def test_the_criterion_rejects_a_wrong_gradient():
    """The oracle criterion can fail: a 10 % error is caught for every dtype's tolerance."""
    ref = torch.linspace(-1, 1, 64, dtype=torch.float64)
    for dtype in TOL:
        same = ref.to(dtype).double()
        assert_close_crit("exact", ref.clone(), ref, same, dtype)
        with pytest.raises(AssertionError, match="wrong"):
            assert_close_crit("wrong", ref * 1.1 + 0.05, ref, same, dtype)
    g = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(AssertionError):  # a zero baseline would have let this pass (bound = |ref|)
        assert_close_crit("d_hidden", g * 1.9, g, g.to(torch.float16).double(), torch.float16)



def test_same_dtype_fallback_baseline_is_close_to_same_dtype_autograd():
    h, w, y, b, keep, _, _ = make_inputs(12, 8, 40, torch.float16, "cpu", bias=True)

    def grads(loss, params, g_up):
        return list(torch.autograd.grad(loss, [p for p in params if p is not None], g_up))

    ph, pw, pb = (t.detach().requires_grad_() for t in (h, w, b))
    kw = dict(keep=keep, softcap=3.0)
    loss, _ = reference_masked_ce(ph, pw, y, dtype=torch.float16, bias=pb, **kw)
    direct = grads(loss, [ph, pw, pb], None)
    fallback = same_dtype_grads(ph, pw, pb, y, None, torch.float16, dict(kw, bias=pb), grads)
    for a, c in zip(direct, fallback):
        assert c.dtype == torch.float16 and torch.count_nonzero(c) > 0
        torch.testing.assert_close(c.float(), a.float(), atol=2e-3, rtol=2e-2)


OPTION_CASES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "softcap": {"softcap": 3.0},
    "everything": {"label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 5.0},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_fp32(backend, device, case, reduction):
    run_case(backend, device, torch.float32, reduction=reduction, opts=OPTION_CASES[case],
             bias=(case == "everything"), stats_args=(case == "plain"))


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_dtypes_and_paths(backend, device, grad_in_forward):
    for dtype in dtypes_for(backend, device):
        run_case(backend, device, dtype, bias=True, grad_in_forward=grad_in_forward,
                 opts={"softcap": 4.0, "label_smoothing": 0.1})


@pytest.mark.parametrize("N,D,V", [(5, 16, 1), (9, 16, 3), (1, 24, 1000), (33, 40, 4099), (17, 20, 257)])
def test_odd_shapes(backend, device, N, D, V):
    run_case(backend, device, torch.float32, N=N, D=D, V=V, bias=True)


def test_shift_3d(backend, device):
    loss, stats = run_case(backend, device, torch.float32, lead=(3, 11), opts={"shift": True}, stats_args=True)
    assert torch.isnan(stats.logprob[:, 0]).all() and not stats.keep[:, 0].any()


def test_reduction_none_with_shift_and_keep(backend, device):
    run_case(backend, device, torch.float32, lead=(2, 13), reduction="none", opts={"shift": True, "z_loss": 1e-3})


def test_all_masked_gives_zero(backend, device):
    h, w, y, b, keep, _, _ = make_inputs(12, 16, 50, torch.float32, device, bias=True)
    h.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    for kp in (torch.zeros_like(keep), None):
        yy = y if kp is not None else torch.full_like(y, -100)
        loss, stats = masked_ce(h, w, yy, bias=b, keep=kp, return_stats=True, backend=backend)
        assert loss.item() == 0.0
        gh, gw, gb = torch.autograd.grad(loss, [h, w, b])
        assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
        assert not stats.keep.any()
        if kp is not None:  # masked tokens are still scored
            assert torch.isfinite(stats.logprob[y != -100]).all()


def test_none_masked_equals_no_keep(backend, device):
    h, w, y, _, keep, _, _ = make_inputs(20, 16, 64, torch.float32, device)
    a = masked_ce(h, w, y, keep=torch.ones_like(keep), backend=backend)
    c = masked_ce(h, w, y, backend=backend)
    torch.testing.assert_close(a, c)


def test_select(backend, device):
    h, w, y, _, keep, _, _ = make_inputs(40, 16, 64, torch.float32, device, seed=3)
    ref_loss, ref_stats = reference_masked_ce(h.cpu(), w.cpu(), y.cpu(), keep=keep.cpu())
    lp = ref_stats["logprob"][~torch.isnan(ref_stats["logprob"])].sort().values
    # a threshold in the widest gap near the median, so float error cannot flip a token
    mid = len(lp) // 2
    gaps = lp[mid - 3 : mid + 3].diff()
    i = int(gaps.argmax()) + mid - 3
    thr = float((lp[i] + lp[i + 1]) / 2)
    calls = []

    def select(s: TokenStats) -> torch.Tensor:
        calls.append(s)
        return s.logprob < thr

    run_case(backend, device, torch.float32, N=40, D=16, V=64, seed=3, select=select)
    calls.clear()
    hh = h.clone().requires_grad_()
    masked_ce(hh, w, y, keep=keep, select=select, backend=backend).backward()
    assert len(calls) == 1  # once per call, inside the forward
    assert isinstance(calls[0], TokenStats)
    assert torch.equal(calls[0].keep, (y != -100) & keep)


def test_num_items_and_accumulation(backend, device):
    """Two micro-batches with num_items = global kept count == one batch with "mean"."""
    h, w, y, _, keep, _, _ = make_inputs(30, 16, 64, torch.float32, device, seed=5)
    w1 = w.clone().requires_grad_()
    full = masked_ce(h, w1, y, keep=keep, backend=backend)
    (g_full,) = torch.autograd.grad(full, [w1])
    total = int(((y != -100) & keep).sum())
    w2 = w.clone().requires_grad_()
    acc = 0
    for sl in (slice(0, 11), slice(11, 30)):
        part = masked_ce(h[sl], w2, y[sl], keep=keep[sl], num_items=total, backend=backend)
        part.backward()
        acc = acc + part.detach()
    torch.testing.assert_close(acc, full.detach())
    torch.testing.assert_close(w2.grad, g_full)
    nt = masked_ce(h, w, y, keep=keep, num_items=torch.tensor(total), backend=backend)
    torch.testing.assert_close(nt, full.detach())


def test_no_grad_does_no_gradient_work(backend, device, monkeypatch):
    be = load_backend(backend)
    seen = []
    orig_fwd, orig_bwd = be.forward, be.backward
    monkeypatch.setattr(be, "forward", lambda *a: (seen.append(("fwd", a[-1])), orig_fwd(*a))[1])
    monkeypatch.setattr(be, "backward", lambda *a: (seen.append(("bwd",)), orig_bwd(*a))[1])
    h, w, y, _, keep, _, _ = make_inputs(10, 16, 32, torch.float32, device)
    hh = h.clone().requires_grad_()
    with torch.no_grad():
        masked_ce(hh, w, y, keep=keep, backend=backend)
    masked_ce(h, w, y, keep=keep, backend=backend)  # nothing requires grad
    assert seen == [("fwd", 0), ("fwd", 0)]


def test_gradient_work_scales_with_kept_rows(backend, device, monkeypatch):
    """Masked rows never reach the gradient code: rows are compacted."""
    be = load_backend(backend)
    rows = []
    orig_fwd, orig_bwd = be.forward, be.backward
    monkeypatch.setattr(be, "forward", lambda *a: (rows.append(("fwd", a[0].shape[0], a[-1])), orig_fwd(*a))[1])
    monkeypatch.setattr(be, "backward", lambda *a: (rows.append(("bwd", a[0].shape[0])), orig_bwd(*a))[1])
    h, w, y, _, keep, _, _ = make_inputs(50, 16, 32, torch.float32, device, ignore_frac=0.0, keep_frac=0.5)
    n_kept = int(keep.sum())
    w.requires_grad_()
    masked_ce(h, w, y, keep=keep, backend=backend).backward()
    assert rows[-1] == ("fwd", n_kept, n_kept)  # no statistics wanted: only kept rows are touched
    rows.clear()
    with xtf_kernels.options(grad_in_forward=False):
        masked_ce(h, w, y, keep=keep, backend=backend, return_stats=True)[0].backward()
    assert rows == [("fwd", 50, 0), ("bwd", n_kept)]


def test_nonfinite_hidden_gives_nonfinite_loss(backend, device):
    h, w, y, _, _, _, _ = make_inputs(8, 16, 32, torch.float32, device, ignore_frac=0.0)
    h[3, 2] = float("nan")
    loss = masked_ce(h, w, y, backend=backend)
    assert not torch.isfinite(loss)
    h[3, 2] = float("inf")
    assert not torch.isfinite(masked_ce(h, w, y, backend=backend))


def test_stats_dtype_and_detached(backend, device):
    h, w, y, _, _, _, _ = make_inputs(8, 16, 32, torch.float32, device)
    h.requires_grad_()
    _, s = masked_ce(h, w, y, return_stats=True, backend=backend)
    for f in ("logprob", "prob", "entropy", "lse"):
        t = getattr(s, f)
        assert t.dtype == torch.float32 and not t.requires_grad and t.shape == y.shape
    assert s.logprob_delta is None and s.relevance is None and s.keep.dtype == torch.bool


def test_bf16_weight_grad_does_not_degrade_with_chunk_count(backend, device):
    """fp32 dW accumulation: error vs float64 stays at one bf16 rounding however many chunks."""
    if not load_backend(backend).supports(torch.device(device), torch.bfloat16)[0]:
        pytest.skip(f"{backend} does not run bf16 on {device}")
    h, w, y, _, _, _, _ = make_inputs(256, 32, 96, torch.bfloat16, device, ignore_frac=0.0)
    ref_w = w.double().cpu().requires_grad_()
    rl, _ = reference_masked_ce(h.double().cpu(), ref_w, y.cpu(), reduction="sum")
    (ref_g,) = torch.autograd.grad(rl, [ref_w])
    errs = []
    for chunk in (1 << 20, 96 * 4):  # 1 chunk vs 64 chunks of 4 rows (native: 32 of 8, chunk_up_to_dw)
        for gif in (True, False):
            ww = w.clone().requires_grad_()
            with xtf_kernels.options(chunk_elems=chunk, grad_in_forward=gif):
                masked_ce(h, ww, y, reduction="sum", backend=backend).backward()
            errs.append(((ww.grad.double().cpu() - ref_g).abs().max() / ref_g.abs().max()).item())
    # one bf16 rounding of the result is ~2**-8 relative; bf16 accumulation over 64 chunks is far worse
    assert max(errs) < 2**-7, errs


@pytest.mark.parametrize("with_extras", [False, True])
def test_rowwise_select_single_pass(backend, device, with_extras, monkeypatch):
    """A rowwise select gives the same result as the global one, without a backward recompute."""
    h, w, y, _, keep, ref_lp, tv = make_inputs(64, 16, 96, torch.float32, device, seed=7)
    ref_loss, ref_stats = reference_masked_ce(h.cpu(), w.cpu(), y.cpu(), keep=keep.cpu())
    lp = ref_stats["logprob"][~torch.isnan(ref_stats["logprob"])].sort().values
    mid = len(lp) // 2
    i = int(lp[mid - 3 : mid + 3].diff().argmax()) + mid - 3
    thr = float((lp[i] + lp[i + 1]) / 2)

    def rule(s):
        m = s.logprob < thr
        if with_extras:
            m = m & (s.logprob_delta > -1e9) & (s.relevance > -2)
        return m

    extras = dict(ref_logprobs=ref_lp, task_vector=tv) if with_extras else {}
    results = []
    be = load_backend(backend)
    calls = []
    orig_bwd = be.backward
    monkeypatch.setattr(be, "backward", lambda *a: (calls.append(1), orig_bwd(*a))[1])
    for sel in (rule, xtf_kernels.rowwise(lambda s: rule(s))):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with xtf_kernels.options(chunk_elems=96 * 5):
            loss, st = masked_ce(hh, ww, y, keep=keep, select=sel, return_stats=True, backend=backend,
                                 **extras)
        loss.backward()
        results.append((loss.detach(), st, hh.grad, ww.grad))
    (l1, s1, gh1, gw1), (l2, s2, gh2, gw2) = results
    torch.testing.assert_close(l1, l2)
    assert torch.equal(s1.keep, s2.keep) and 0 < int(s2.keep.sum()) < int(keep.sum())
    torch.testing.assert_close(s1.entropy, s2.entropy, equal_nan=True)
    torch.testing.assert_close(gh1, gh2)
    torch.testing.assert_close(gw1, gw2)
    one_gemm = type(be).forward_rowwise is not BackendBase.forward_rowwise
    assert len(calls) == (1 if one_gemm else 2)  # the global select recomputes; rowwise does not


def test_dynamic_xtf_policy_is_rowwise_and_exact(backend, device):
    from xtf_kernels.xtf.dynamic import DynamicXTF

    h, w, y, _, keep, ref_lp, _ = make_inputs(48, 16, 96, torch.float32, device, seed=11)
    h = h * 6  # confident predictions, so the KN rule fires on some tokens
    out = []
    for pol in (DynamicXTF(kn_threshold=0.9, excess_loss_min=-50.0), DynamicXTF(kn_threshold=0.9, excess_loss_keep_ratio=1.0)):
        hh = h.clone().requires_grad_()
        with xtf_kernels.options(chunk_elems=96 * 7):
            loss, st = masked_ce(hh, w, y, keep=keep, select=pol, ref_logprobs=ref_lp, return_stats=True,
                                 backend=backend)
        loss.backward()
        out.append((pol.rowwise, loss.detach(), st.keep, hh.grad, pol.end_step()))
    (r1, l1, k1, g1, rec1), (r2, l2, k2, g2, rec2) = out
    assert r1 and not r2
    assert torch.equal(k1, k2) and 0 < int(k1.sum()) < int(((y != -100) & keep).sum())
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    assert rec1["kn"] == rec2["kn"] and rec1["tokens"] == rec2["tokens"]
