"""The Triton backend's contract methods against the float64 torch backend.

Without a CUDA device these run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton). Criterion, as in test_masked_ce.py:
|ref - ours| <= |ref - same-dtype torch backend| + atol + rtol * |ref|, elementwise.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._reference import absolute_stats
from tests.conftest import DEVICE
from xtf_kernels.backends.base import CEConfig, ForwardOut
from xtf_kernels.backends.torch_backend import TorchBackend

ROOT = Path(__file__).resolve().parents[2]

triton_backend = pytest.importorskip("xtf_kernels.backends.triton_backend")
TB = triton_backend.TritonBackend()
AVAILABLE, WHY = TB.available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"triton backend unavailable: {WHY}")
TORCH = TorchBackend()

TOL = {
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

CFGS = {
    "plain": CEConfig(chunk_elems=2048),
    "all": CEConfig(softcap=4.0, label_smoothing=0.1, z_loss=1e-3, chunk_elems=2048),
}


def kernels():
    from xtf_kernels.backends._triton import kernels as k

    return k


def close(name: str, ours, ref, same, dtype) -> None:
    """|ref - ours| <= |ref - same| + atol + rtol |ref| elementwise (None must match None)."""
    if ref is None:
        assert ours is None, f"{name}: expected None"
        return
    atol, rtol = TOL[dtype]
    ours, ref, same = (t.detach().double().cpu() for t in (ours, ref, same))
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    bound = (ref - same).abs() + atol + rtol * ref.abs()
    err = (ours - ref).abs()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: max excess error {worst:.3e} (max err {err.max().item():.3e})"


def problem(M, D, V, dtype, *, bias=True, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, D, generator=g) * scale).to(dtype).to(DEVICE)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    y = torch.randint(0, V, (M,), generator=g).to(DEVICE)
    return x, w, b, y


def as64(*ts):
    return [None if t is None else t.double().cpu() for t in ts]


def check_forward(M, D, V, dtype, cfg, n_grad, bias=True, seed=0, scale=0.5):
    x, w, b, y = problem(M, D, V, dtype, bias=bias, seed=seed, scale=scale)
    ours = TB.forward(x, w, b, y, cfg, n_grad)
    x64, w64, b64 = as64(x, w, b)
    ref = TORCH.forward(x64, w64, b64, y.cpu(), cfg, n_grad)
    same = TORCH.forward(x.cpu(), w.cpu(), None if b is None else b.cpu(), y.cpu(), cfg, n_grad)
    for f in ("row_max", "lse", "gold", "entropy", "sum_logits"):
        o = getattr(ours, f)
        assert o.dtype == torch.float32 and o.shape == (M,), f
    o, r, sm = (absolute_stats(t, V) for t in (ours, ref, same))
    for f in r:
        close(f, o[f], r[f], sm[f], dtype)
    if n_grad:
        assert ours.dx.dtype == dtype and ours.dx.shape == (n_grad, D)
        assert ours.dw.dtype in (torch.float32, dtype)  # w.dtype when one GEMM formed each block
        close("dx", ours.dx, ref.dx, same.dx, dtype)
        close("dw", ours.dw, ref.dw, same.dw, dtype)
        close("db", ours.db, ref.db, same.db, dtype)
    else:
        assert ours.dx is None and ours.dw is None and ours.db is None
    return ours


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(CFGS))
@pytest.mark.parametrize("M,D,V,n_grad", [(33, 24, 1000, 20), (1, 40, 3, 1), (17, 24, 1, 9)])
def test_forward_vs_float64(M, D, V, n_grad, cfg, dtype):
    check_forward(M, D, V, dtype, CFGS[cfg], n_grad)


@pytest.mark.parametrize("M,D,V,n_grad", [(33, 40, 4099, 33), (12, 40, 2048, 0), (0, 24, 3, 0)])
def test_forward_odd_shapes(M, D, V, n_grad):
    check_forward(M, D, V, torch.float32, CFGS["all"], n_grad, bias=(V != 2048))


def test_forward_statistics_only_no_bias_fp16():
    check_forward(33, 40, 1000, torch.float16, CFGS["all"], 0, bias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_gradient_paths_agree(monkeypatch, dtype):
    # gradient rows in one row chunk: Liger-style buffer path (3 GEMMs); more rows: fused
    # statistics + vocabulary-blocked gradient. Both must give the same result.
    from xtf_kernels.backends import driver

    calls = []
    for name in ("_sweep", "_blocked_grad"):
        orig = getattr(driver, name)

        def spy(*a, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(*a, **kw)

        monkeypatch.setattr(driver, name, spy)
    x, w, b, y = problem(24, 40, 500, dtype, seed=11)
    big = CEConfig(softcap=5.0, label_smoothing=0.1, z_loss=1e-3, chunk_elems=1 << 16)
    small = CEConfig(softcap=5.0, label_smoothing=0.1, z_loss=1e-3, chunk_elems=1 << 11)
    a = TB.forward(x, w, b, y, big, 16)
    assert calls == ["_sweep"]
    c = TB.forward(x, w, b, y, small, 16)
    assert calls[1:] == ["_blocked_grad"]
    atol, rtol = TOL[dtype]
    for f in ("row_max", "lse", "gold", "entropy", "dx", "dw", "db"):
        torch.testing.assert_close(getattr(c, f).float(), getattr(a, f).float(), atol=atol, rtol=rtol)


def test_large_logits_stay_accurate():
    # logits of magnitude ~100: the online log-sum-exp and the shifted entropy sum must not
    # lose the (small) entropy to cancellation
    check_forward(16, 24, 700, torch.float32, CEConfig(chunk_elems=2048), 8, scale=40.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(CFGS))
@pytest.mark.parametrize("M,D,V", [(33, 40, 1000), (1, 24, 3), (5, 24, 1)])
def test_backward_row_scale(M, D, V, cfg, dtype):
    cfg = CFGS[cfg]
    x, w, b, y = problem(M, D, V, dtype, seed=2)
    x64, w64, b64 = as64(x, w, b)
    fo = TORCH.forward(x64, w64, b64, y.cpu(), cfg, 0)
    mx, lse = fo.row_max, fo.lse
    g = torch.Generator().manual_seed(5)
    scale = torch.randn(M, generator=g, dtype=torch.float64)
    scale[::4] = 0.0  # rows with a zero upstream gradient contribute nothing
    ours = TB.backward(x, w, b, y, mx.float().to(DEVICE), lse.float().to(DEVICE), scale.float().to(DEVICE), cfg)
    ref = TORCH.backward(x64, w64, b64, y.cpu(), mx, lse, scale, cfg)
    same = TORCH.backward(x.cpu(), w.cpu(), b.cpu(), y.cpu(), mx.float(), lse.float(), scale.float(), cfg)
    assert ours.dx.dtype == dtype and ours.db.dtype == torch.float32
    # fp32, or w.dtype when one GEMM formed each vocabulary block of dW (fp32 inside it)
    assert ours.dw.dtype in (torch.float32, dtype)
    close("dx", ours.dx, ref.dx, same.dx, dtype)
    close("dw", ours.dw, ref.dw, same.dw, dtype)
    close("db", ours.db, ref.db, same.db, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_blocks_rows_and_vocabulary(dtype):
    # more rows than sqrt(budget): row chunks inside each vocabulary block, so dW is
    # accumulated (in fp32) across chunks as well as dx across blocks
    M, D, V = 40, 24, 300
    cfg = CEConfig(softcap=4.0, label_smoothing=0.1, z_loss=1e-3, chunk_elems=128)
    x, w, b, y = problem(M, D, V, dtype, seed=12)
    x64, w64, b64 = as64(x, w, b)
    fo = TORCH.forward(x64, w64, b64, y.cpu(), cfg, 0)
    mx, lse = fo.row_max, fo.lse
    scale = torch.linspace(-1.0, 2.0, M, dtype=torch.float64)
    ours = TB.backward(x, w, b, y, mx.float().to(DEVICE), lse.float().to(DEVICE), scale.float().to(DEVICE), cfg)
    assert ours.dw.dtype == torch.float32
    ref = TORCH.backward(x64, w64, b64, y.cpu(), mx, lse, scale, cfg)
    same = TORCH.backward(x.cpu(), w.cpu(), b.cpu(), y.cpu(), mx.float(), lse.float(), scale.float(), cfg)
    close("dx", ours.dx, ref.dx, same.dx, dtype)
    close("dw", ours.dw, ref.dw, same.dw, dtype)
    close("db", ours.db, ref.db, same.db, dtype)


def test_backward_without_rows_gives_zeros():
    x, w, b, y = problem(0, 24, 50, torch.float32)
    empty = torch.empty(0, device=DEVICE)
    out = TB.backward(x, w, b, y, empty, empty, empty, CFGS["plain"])
    assert out.dx.shape == (0, 24)
    assert torch.count_nonzero(out.dw) == 0 and torch.count_nonzero(out.db) == 0


def test_forward_rowwise_selects_and_matches():
    M, D, V = 40, 24, 600
    cfg = CFGS["all"]
    x, w, b, y = problem(M, D, V, torch.float32, seed=7)
    calls = []

    def rule(s, e, mx, lse, gold, ent):
        calls.append((s, e, mx.clone(), lse.clone(), gold.clone(), ent.clone()))
        return (torch.arange(s, e, device=lse.device) % 3) != 0

    ours, sel = TB.forward_rowwise(x, w, b, y, cfg, rule)
    seen = list(calls)  # the reference runs below call the rule too
    assert len(seen) > 1, "expected several chunks at this chunk size"
    assert [(s, e) for s, e, *_ in seen][-1][1] == M
    x64, w64, b64 = as64(x, w, b)
    ref, ref_sel = TORCH.forward_rowwise(x64, w64, b64, y.cpu(), cfg, lambda s, e, *a: rule(s, e, *a))
    assert torch.equal(sel.cpu(), ref_sel) and sel.dtype == torch.bool
    same, _ = TORCH.forward_rowwise(x.cpu(), w.cpu(), b.cpu(), y.cpu(), cfg, lambda s, e, *a: rule(s, e, *a))
    for f in ("dx", "dw", "db"):
        close(f, getattr(ours, f), getattr(ref, f), getattr(same, f), torch.float32)
    o, r, sm = (absolute_stats(t, V) for t in (ours, ref, same))
    for f in r:
        close(f, o[f], r[f], sm[f], torch.float32)
    # the rule saw the final statistics of its chunk
    for s, e, mx, lse, gold, ent in seen:
        torch.testing.assert_close(mx, ours.row_max[s:e])
        torch.testing.assert_close(lse, ours.lse[s:e])
        torch.testing.assert_close(gold, ours.gold[s:e])
        torch.testing.assert_close(ent, ours.entropy[s:e])


def test_forward_rowwise_nothing_selected():
    x, w, b, y = problem(9, 16, 40, torch.float32)
    out, sel = TB.forward_rowwise(x, w, b, y, CFGS["plain"], lambda s, e, *a: torch.zeros(e - s, dtype=torch.bool))
    assert not sel.any() and out.dx.shape == (0, 16)
    assert torch.count_nonzero(out.dw) == 0 and torch.count_nonzero(out.db) == 0


@pytest.mark.parametrize("splits", [2, 3])
def test_vocab_splits_merge(splits):
    # the fused kernel's vocabulary splits (used on GPUs to fill the SMs) merge exactly
    M, D, V = 20, 24, 1500
    x, w, b, y = problem(M, D, V, torch.float32, seed=3)
    k = kernels()
    assert k._splits(M, V, x.device, splits)[0] == splits
    out1 = torch.empty(5, M, device=DEVICE)
    outs = torch.empty(5, M, device=DEVICE)
    k.fused_stats(x, w, b, y, 3.0, out1, splits=1)
    k.fused_stats(x, w, b, y, 3.0, outs, splits=splits)
    torch.testing.assert_close(outs, out1, atol=2e-5, rtol=1e-5)
    ref = absolute_stats(TORCH.forward(*as64(x, w, b), y.cpu(), CEConfig(softcap=3.0), 0), V)
    ours = absolute_stats(ForwardOut(*outs, None, None, None), V)
    for f in ("lse", "logprob", "entropy", "mean_logit"):
        torch.testing.assert_close(ours[f], ref[f], atol=2e-5, rtol=1e-5)


def test_row_kernel_respects_buffer_row_stride():
    # a logits buffer whose rows are further apart than V (a column slice of a wider buffer)
    M, D, V = 12, 16, 300
    x, w, b, y = problem(M, D, V, torch.float32, seed=4)
    wide = torch.full((M, V + 37), float("nan"), device=DEVICE)
    view = wide[:, :V]
    view.copy_(x @ w.t())
    stats = torch.empty(5, M, device=DEVICE)
    kernels().rows_stats_grad(view, b, y, softcap=None, z_loss=0.0, label_smoothing=0.0, stats_out=stats)
    ref = TORCH.forward(*as64(x, w, b), y.cpu(), CEConfig(), M)
    torch.testing.assert_close((stats[0] + stats[1]).cpu().double(), ref.row_max + ref.lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view.cpu().double() @ w.cpu().double(), ref.dx, atol=1e-5, rtol=1e-5)
    assert torch.isnan(wide[:, V:]).all(), "wrote outside the row"


@pytest.mark.parametrize("ieee", [False, True])
@pytest.mark.parametrize("M", [1, 40, 5000])
def test_autotune_pruning(M, ieee):
    k = kernels()
    kept = k._prune_configs(k._FUSED_CONFIGS, {"M": M}, IEEE=ieee)
    assert kept and all(c in k._FUSED_CONFIGS for c in kept)
    size = 4 if ieee else 2
    for c in kept:
        kw = c.kwargs
        assert min(kw["BM"], kw["BV"], kw["BD"]) >= 16  # tl.dot needs >= 16 in every dim
        assert (kw["BM"] + kw["BV"]) * kw["BD"] * size * c.num_stages <= 200_000
        assert kw["BM"] <= max(16, 1 << (M - 1).bit_length())
    if M >= 5000:
        assert any(c.kwargs["BM"] == 128 for c in kept)


def test_row_offsets_are_int64():
    rows = torch.tensor([0, 1, 2, 3, 7, 100, 4095, 4096, 65535, 65536, 2**20, 2**21 + 5,
                         2**24, 2**26 + 1, 2**30, 2**31 - 1], dtype=torch.int32, device=DEVICE)
    stride = 2**20 + 3  # row * stride exceeds 2**31 for most rows
    from tests._triton_probes import row_offsets

    got = row_offsets(rows, stride)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), rows.cpu().long() * stride)
    assert (rows.cpu().long() * stride > 2**31).sum() >= 8


def test_kernels_index_rows_through_the_int64_helper():
    k = kernels()
    src_stats = inspect.getsource(k._stats_kernel.fn)
    src_rows = inspect.getsource(k._rows_kernel.fn)
    assert "row_offset(rows, stride_x)" in src_stats and "row_offset(cols, stride_w)" in src_stats
    assert "row_offset(row, stride_l)" in src_rows and "row_offset(row, stride_o)" in src_rows
    assert "to(tl.int64) * M" in src_stats  # partial-statistics offsets


def test_nan_row_stays_local():
    x, w, b, y = problem(10, 16, 64, torch.float32)
    x[3, 5] = float("nan")
    out = TB.forward(x, w, b, y, CFGS["plain"], 4)
    assert torch.isnan(out.lse[3]) and torch.isnan(out.entropy[3])
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    assert torch.isfinite(out.lse[keep]).all() and torch.isfinite(out.entropy[keep]).all()


def test_supports_messages():
    assert TB.supports(torch.device(DEVICE), torch.float32) == (True, "")
    assert TB.supports(torch.device(DEVICE), torch.float16) == (True, "")
    ok, why = TB.supports(torch.device(DEVICE), torch.float64)
    assert not ok and "dtype" in why
    ok, why = TB.supports(torch.device("meta"), torch.float32)
    assert not ok and "device" in why
    if DEVICE == "cpu":
        ok, why = TB.supports(torch.device("cpu"), torch.bfloat16)
        assert not ok and "11584" in why and "interpreter" in why
    else:
        assert TB.supports(torch.device("cuda"), torch.bfloat16) == (True, "")


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_unavailable_without_triton():
    # importing the backend never needs triton; available() says why it cannot run
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from xtf_kernels.backends.triton_backend import TritonBackend\n"
        "import torch\n"
        "b = TritonBackend(); print(b.available()); print(b.supports(torch.device('cpu'), torch.float32))\n"
    )
    out = _run(code, dict(os.environ, TRITON_INTERPRET="1"))
    assert out.count("(False, 'triton cannot be imported") == 2, out


@pytest.mark.skipif(DEVICE == "cuda", reason="a CUDA device makes the backend available")
def test_unavailable_without_cuda_or_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from xtf_kernels.backends.triton_backend import TritonBackend\n"
            "print(TritonBackend().available())\n")
    out = _run(code, env)
    assert out.startswith("(False,") and "no CUDA device; set TRITON_INTERPRET=1" in out, out


def test_registry_reports_triton():
    import xtf_kernels

    status = xtf_kernels.backend_status()
    assert status["triton"] == (True, "")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_cuda_int64_offsets_in_the_row_kernel():
    # a [2, V] logits view whose second row starts past 2**31 elements (4 GiB of fp16)
    V = 4096
    stride = 2**31 + 64
    store = torch.zeros(stride + V, dtype=torch.float16, device="cuda")
    view = store.as_strided((2, V), (stride, 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    vals = torch.randn(2, V, device="cuda", generator=g).half()
    view.copy_(vals)
    y = torch.tensor([5, 4000], device="cuda")
    stats = torch.empty(5, 2, device="cuda")
    kernels().rows_stats_grad(view, None, y, softcap=None, z_loss=0.0, label_smoothing=0.0, stats_out=stats)
    ref = torch.logsumexp(vals.float(), dim=1)
    torch.testing.assert_close(stats[0] + stats[1], ref, atol=1e-4, rtol=1e-4)
    p = torch.softmax(vals.float(), dim=1)
    p[0, 5] -= 1
    p[1, 4000] -= 1
    torch.testing.assert_close(view.float(), p, atol=2e-3, rtol=1e-2)
    del store


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_cuda_autotuned_fused_stats_bf16_and_splits():
    M, D, V = 300, 128, 50_000
    x, w, b, y = problem(M, D, V, torch.bfloat16, seed=9)
    out = absolute_stats(TB.forward(x, w, b, y, CEConfig(softcap=30.0), 0), V)
    ref = absolute_stats(TORCH.forward(*as64(x, w, b), y.cpu(), CEConfig(softcap=30.0), 0), V)
    torch.testing.assert_close(out["lse"], ref["lse"], atol=2e-2, rtol=1e-3)
    torch.testing.assert_close(out["entropy"], ref["entropy"], atol=2e-2, rtol=1e-2)
    assert math.isfinite(out["mean_logit"].sum().item())


_COMPILE_SM90 = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xtf_kernels.backends._triton import kernels as k
assert not k.INTERPRETED
target = GPUTarget("cuda", 90, 32)
stats_sig = {n: t for n, t in zip(
    ["X", "W", "B", "Y", "PART", "M", "V", "D", "VS", "SM", "stride_x", "stride_w", "cap", "M_KEY"],
    ["*bf16", "*bf16", "*bf16", "*i64", "*fp32"] + ["i32"] * 7 + ["fp32", "i32"])}
for c in ("HAS_BIAS", "HAS_CAP", "IEEE", "BM", "BV", "BD"):
    stats_sig[c] = "constexpr"
cfg = k._FUSED_CONFIGS[0]
src = ASTSource(fn=k._stats_kernel, signature=stats_sig,
                constexprs=dict(HAS_BIAS=True, HAS_CAP=True, IEEE=False, **cfg.kwargs))
triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
names = ["L", "stride_l", "OUT", "stride_o", "B", "Y", "MAX", "LSE", "SCALE", "STATS",
         "stride_st", "n", "V", "v_off", "cap", "z_loss_x2", "gold_weight", "smooth_per_id"]
br, bv, warps = 1, 8192, 16
for logits, stats in (("*bf16", True), ("*bf16", False), ("*fp32", True)):
    rows_sig = {n: t for n, t in zip(names, [logits, "i32", "*bf16", "i32", "*bf16", "*i64"]
                                     + ["*fp32"] * 4 + ["i32"] * 4 + ["fp32"] * 4)}
    for c in ("HAS_BIAS", "HAS_CAP", "HAS_SCALE", "DO_STATS", "DO_GRAD", "BR", "BV"):
        rows_sig[c] = "constexpr"
    src = ASTSource(fn=k._rows_kernel, signature=rows_sig, constexprs=dict(
        HAS_BIAS=True, HAS_CAP=True, HAS_SCALE=not stats, DO_STATS=stats,
        DO_GRAD=True, BR=br, BV=bv))
    triton.compile(src, target=target, options={"num_warps": warps})
print("compiled")
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    # catches GPU-only compile errors (layouts, types, loop-carried values) in CPU-only CI
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's bundled ptxas is missing")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    assert "compiled" in _run(_COMPILE_SM90, env)


def test_vocab_blocks_are_aligned_for_cublas(monkeypatch):
    """Regression (found on an H200): vocabulary blocks of odd width gave the logits buffer an
    unaligned row stride, which pushed cuBLAS off its tensor-core kernels (4-7x slower). Block
    widths are multiples of 128 and every block, the last too, keeps the buffer's stride."""
    k = kernels()
    seen = []
    real = k.rows_grad

    def spy(logits, *a, **kw):
        seen.append((logits.shape[1], logits.stride(0)))
        return real(logits, *a, **kw)

    monkeypatch.setattr(k, "rows_grad", spy)
    M, D, V = 7, 16, 1000  # budget // M = 585: not a multiple of 128
    x, w, b, y = problem(M, D, V, torch.float32, seed=3)
    fo = TORCH.forward(x.cpu(), w.cpu(), b.cpu(), y.cpu(), CFGS["plain"], 0)
    mx, lse = fo.row_max.to(x.device), fo.lse.to(x.device)
    cfg = CEConfig(chunk_elems=4096)
    ours = TB.backward(x, w, b, y, mx, lse, torch.ones(M, device=x.device), cfg)
    widths = {s for _, s in seen}
    assert len(seen) > 1 and len(widths) == 1 and widths.pop() % 128 == 0, seen
    assert seen[-1][0] == V % seen[0][1]  # the last, narrower block keeps the stride
    x64, w64, b64 = as64(x, w, b)
    ref = TORCH.backward(x64, w64, b64, y.cpu(), mx.cpu().double(), lse.cpu().double(),
                         torch.ones(M, dtype=torch.float64), cfg)
    same = TORCH.backward(x.cpu(), w.cpu(), b.cpu(), y.cpu(), mx.cpu(), lse.cpu(), torch.ones(M), cfg)
    for f in ("dx", "dw", "db"):
        close(f, getattr(ours, f), getattr(ref, f), getattr(same, f), torch.float32)
