"""Native CPU backend specifics: the C++ row kernels, the memory plans, the loader and info.

The masked-CE semantics (every option, statistic, reduction, select, mask) are covered for
this backend by the shared parametrised suite in tests/masked_ce/test_masked_ce.py; these tests pin
what only the native backend has.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xtf_kernels
from tests._reference import absolute_stats
from xtf_kernels import masked_ce
from xtf_kernels.backends import CEConfig, ForwardOut, load_backend

REPO = Path(__file__).resolve().parents[2]
NATIVE_OK, NATIVE_WHY = xtf_kernels.backend_status().get("native", (False, "not registered"))
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"native backend unavailable: {NATIVE_WHY}")


def _ext():
    from xtf_kernels._native_build import load_native

    return load_native()


def _ref_stats_grad(raw, y, bias, cap, ls, zl):
    """float64 statistics and d loss / d raw of every row (the math of backends/base.py)."""
    r = raw.double() + (0 if bias is None else bias.double())
    z = cap * torch.tanh(r / cap) if cap is not None else r
    lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    gold = z.gather(1, y[:, None])[:, 0]
    ent = lse - (p * z).sum(1)
    V = z.shape[1]
    g = p * (1 + 2 * zl * lse)[:, None] - ls / V
    g[torch.arange(len(y)), y] -= 1 - ls
    if cap is not None:
        g = g * (1 - (z / cap) ** 2)
    return lse, gold, ent, z.sum(1), g


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap,bias,ls,zl", [(None, False, 0.0, 0.0), (5.0, True, 0.1, 1e-3)])
def test_row_kernel_matches_float64(dtype, cap, bias, ls, zl):
    g = torch.Generator().manual_seed(0)
    R, V = 7, 3001  # odd V: vector tails
    raw = (torch.randn(R, V, generator=g) * 4).to(dtype)
    y = torch.randint(0, V, (R,), generator=g)
    b = torch.randn(V, generator=g) if bias else None
    lse, gold, ent, zs, grad = _ref_stats_grad(raw.float(), y, b, cap, ls, zl)
    z = raw.clone()
    out = _ext().stats_and_grad(z, y, b, cap, ls, zl, 4)  # gradient for the first 4 rows only
    assert len(out) == 5 and all(t.dtype == torch.float32 for t in out)
    ours = absolute_stats(ForwardOut(*out, None, None, None), V)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    for name, ref in zip(("lse", "gold", "entropy", "mean_logit"), (lse, gold, ent, zs / V)):
        torch.testing.assert_close(ours[name], ref, rtol=tol, atol=tol, msg=name)
    gtol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    torch.testing.assert_close(z[:4].double(), grad[:4], rtol=gtol, atol=gtol)
    assert torch.equal(z[4:], raw[4:])  # scored-only rows are left untouched


@needs_native
def test_row_kernel_extreme_logits_and_nan():
    V = 513
    raw = torch.zeros(3, V)
    raw[0, 5] = 1e4        # one dominant logit: lse = 1e4, no overflow
    raw[1] = -1e4          # all very negative
    raw[1, 7] = -9990.0
    raw[2, 3] = float("nan")
    y = torch.tensor([5, 7, 0])
    mx, lse_r, gold_r, ent, _ = _ext().stats_and_grad(raw.clone(), y, None, None, 0.0, 0.0, 0)
    lse, gold = mx + lse_r, mx + gold_r
    assert lse[0].item() == pytest.approx(1e4) and abs(ent[0].item()) < 1e-3
    ref1 = torch.logsumexp(raw[1].double(), 0).item()  # -9990 + log(1 + 512 e^-10)
    assert lse[1].item() == pytest.approx(ref1, abs=1e-2) and gold[1].item() == -9990.0
    # relative to the row max, the log-prob keeps full precision at these magnitudes
    assert (gold_r - lse_r)[1].item() == pytest.approx(-math.log1p(512 * math.exp(-10)), abs=2e-6)
    assert torch.isnan(lse[2])


@needs_native
def test_vocab_block_gradient_equals_full_row():
    g = torch.Generator().manual_seed(1)
    R, V = 5, 1000
    raw = torch.randn(R, V, generator=g) * 3
    y = torch.randint(0, V, (R,), generator=g)
    scale = torch.rand(R, generator=g)
    full = raw.clone()
    mx, lse = _ext().stats_and_grad(full, y, None, 3.0, 0.05, 1e-2, R)[:2]
    pieces = []
    for v0 in range(0, V, 300):
        blk = raw[:, v0 : v0 + 300].clone()
        _ext().grad_block_(blk, y, mx, lse, scale, None, v0, V, 3.0, 0.05, 1e-2)
        pieces.append(blk)
    torch.testing.assert_close(torch.cat(pieces, 1), full * scale[:, None], rtol=1e-5, atol=1e-7)


@needs_native
def test_kernel_rejects_bad_arguments():
    ext = _ext()
    with pytest.raises(RuntimeError, match="z: expected a 2-D"):
        ext.stats_and_grad(torch.zeros(4), torch.zeros(4, dtype=torch.long), None, None, 0.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="y: expected a contiguous 1-D"):
        ext.stats_and_grad(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), None, None, 0.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="n_grad: expected"):
        ext.stats_and_grad(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), None, None, 0.0, 0.0, 3)
    with pytest.raises(RuntimeError, match="v0: expected"):
        ext.grad_block_(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2),
                        None, None, 8, 10, None, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="row_max: expected"):
        ext.grad_block_(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3), torch.zeros(2),
                        None, None, 0, 4, None, 0.0, 0.0)


def _problem(M, D, V, dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, D, generator=g) * 0.5).to(dtype)
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(dtype)
    y = torch.randint(0, V, (M,), generator=g)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    return x, w, b, y


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_plans_agree(dtype, monkeypatch):
    """bf16: all gradient logits kept (one dW GEMM) vs row groups + fp32 accumulator;
    fp32: chunked addmm. Same results, and the [V, D] fp32 buffer only where planned.
    (The bf16 plans are those of XTF_CPU_HALF_GEMM=half; by default bf16 runs the fp32 plan.)"""
    monkeypatch.setenv("XTF_CPU_HALF_GEMM", "half")
    be = load_backend("native")
    M, D, V = 64, 16, 200
    x, w, b, y = _problem(M, D, V, dtype, bias=True)
    big = []

    def spying(real):
        def spy(*shape, **kw):
            if tuple(shape) == (V, D) and kw.get("dtype") == torch.float32:
                big.append(1)
            return real(*shape, **kw)
        return spy

    real = {name: getattr(torch, name) for name in ("zeros", "empty")}  # either allocates the fp32 buffer
    for name, fn in real.items():
        monkeypatch.setattr(torch, name, spying(fn))
    one = be.forward(x, w, b, y, CEConfig(chunk_elems=1 << 22), M)
    n_big_one = len(big)
    # chunk_up_to_dw doubles the budget (V * D is larger): 4 (fp32) / 8 (bf16) rows a chunk
    many = be.forward(x, w, b, y, CEConfig(chunk_elems=V * 2), M)
    for name, fn in real.items():
        monkeypatch.setattr(torch, name, fn)
    if dtype == torch.bfloat16:
        assert n_big_one == 0 and len(big) == 1  # keep-all plan: no fp32 [V, D] buffer
        assert one.dw.dtype == torch.bfloat16
    ref = load_backend("torch").forward(x, w, b, y, CEConfig(chunk_elems=1 << 22), M)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    ref_st = absolute_stats(ref, V)
    for out in (one, many):
        st = absolute_stats(out, V)
        for f in ("lse", "gold", "entropy", "logprob"):
            torch.testing.assert_close(st[f], ref_st[f], rtol=1e-3, atol=3e-3)
        torch.testing.assert_close(out.dx.float(), ref.dx.float(), **tol)
        torch.testing.assert_close(out.dw.float(), ref.dw.float(), **tol)
        # db is summed in fp32 inside the kernel, before the gradient logits are rounded: it
        # matches float64 sums over the same GEMM output (this backend rounds the GEMM
        # output to the input dtype before the bias, see docs/numerics.md)
        z = (x @ w.t()).double() + b.double()
        g = torch.softmax(z, 1)
        g[torch.arange(M), y] -= 1
        torch.testing.assert_close(out.db.double(), g.sum(0), rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_row_chunks_equal_one_chunk(dtype):
    be = load_backend("native")
    x, w, b, y = _problem(40, 16, 300, dtype, seed=2, bias=True)
    fo = be.forward(x, w, b, y, CEConfig(), 0)
    scale = torch.linspace(0.1, 1.0, 40)
    a = be.backward(x, w, b, y, fo.row_max, fo.lse, scale, CEConfig(chunk_elems=1 << 22))
    c = be.backward(x, w, b, y, fo.row_max, fo.lse, scale, CEConfig(chunk_elems=256))  # row-chunked blocks
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for u, v in zip(a, c):
        torch.testing.assert_close(u.float(), v.float(), **tol)


@needs_native
def test_rowwise_grouped_plan_matches_keep_all():
    """forward_rowwise: the fp32-accumulator fallback equals the keep-all plan (bf16)."""
    be = load_backend("native")
    x, w, b, y = _problem(48, 8, 256, torch.bfloat16, seed=3)

    def sel(s, e, mx, lse, gold, ent):
        return (gold - lse) < -5.5

    a, sa = be.forward_rowwise(x, w, b, y, CEConfig(chunk_elems=1 << 22), sel)
    c, sc = be.forward_rowwise(x, w, b, y, CEConfig(chunk_elems=256), sel)
    assert torch.equal(sa, sc) and 0 < int(sa.sum()) < 48
    torch.testing.assert_close(a.dx.float(), c.dx.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(a.dw.float(), c.dw.float(), rtol=2e-2, atol=2e-3)


@needs_native
def test_backend_supports():
    be = load_backend("native")
    assert be.supports(torch.device("cpu"), torch.bfloat16) == (True, "")
    assert not be.supports(torch.device("meta"), torch.float32)[0]


@needs_native
def test_auto_picks_native_on_cpu():
    from xtf_kernels.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16).name == "native"


def test_build_key_tracks_sources(tmp_path):
    from xtf_kernels import _native_build as nb

    src = nb.source_dir()
    assert src is not None and (src / "masked_ce_cpu.cpp").is_file()
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    k1 = nb.build_key(copy)
    assert k1 == nb.build_key(src)
    with open(copy / "masked_ce_cpu.cpp", "a") as fh:
        fh.write("\n// changed\n")
    assert nb.build_key(copy) != k1


def _run(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=180)


FALLBACK = """
import warnings, torch, xtf_kernels
from xtf_kernels import masked_ce
st = xtf_kernels.backend_status()["native"]
h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    masked_ce(h, w, y)
    masked_ce(h, w, y)
msgs = [str(r.message) for r in rec if "native" in str(r.message)]
try:
    masked_ce(h, w, y, backend="native"); err = ""
except RuntimeError as e:
    err = str(e)
print("@@" + __import__("json").dumps({"status": st, "warnings": msgs, "err": err}))
"""


@pytest.mark.parametrize("how", ["disabled", "no-compiler"])
def test_unavailable_native_falls_back_with_one_warning(how, tmp_path):
    env = {"XTF_CACHE": str(tmp_path / "cache")}
    if how == "disabled":
        env["XTF_DISABLE_NATIVE"] = "1"
        reason = "disabled by XTF_DISABLE_NATIVE"
    else:
        env["CXX"] = "/nonexistent/c++"
        env["PATH"] = str(tmp_path)  # no g++ / clang++ / ninja reachable
        reason = "no C++ compiler found"
    p = _run(FALLBACK, env)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("@@"))[2:])
    assert out["status"][0] is False and reason in out["status"][1]
    assert len(out["warnings"]) == 1 and "falling back to the torch backend" in out["warnings"][0]
    assert "backend='native' is not available here" in out["err"] and reason in out["err"]


def test_info_reports_every_backend():
    from xtf_kernels import info

    data = info.collect()
    assert set(data["backends"]) >= {"torch", "native", "triton"}
    assert data["backends"]["torch"]["available"] is True
    for st in data["backends"].values():
        assert st["available"] or st["reason"]  # unavailable always says why
    text = info.format_report(data)
    assert "backends:" in text and "native" in text
    p = subprocess.run([sys.executable, "-m", "xtf_kernels.info", "--json"], capture_output=True,
                       text=True, cwd=str(REPO), timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["backends"]["native"]["available"] is NATIVE_OK


@needs_native
def test_masked_ce_native_bf16_end_to_end_vs_torch_backend():
    """A larger-than-unit-test bf16 problem through the public API: native == torch backend."""
    x, w, _, y = _problem(96, 64, 4099, torch.bfloat16, seed=5)
    y[::7] = -100
    outs = []
    for be in ("native", "torch"):
        hh, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, st = masked_ce(hh, ww, y, return_stats=True, backend=be, z_loss=1e-4)
        loss.backward()
        outs.append((loss.detach(), st.entropy, hh.grad.float(), ww.grad.float()))
    (l1, e1, h1, w1), (l2, e2, h2, w2) = outs
    torch.testing.assert_close(l1, l2, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(e1, e2, rtol=2e-2, atol=2e-2, equal_nan=True)
    torch.testing.assert_close(h1, h2, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(w1, w2, rtol=2e-2, atol=1e-5)


NO_OPENMP = """
import xtf_kernels._native_build as nb
nb._OPENMP = ("-fno-such-openmp-flag",)  # a compiler that refuses the OpenMP flag
mod = nb.load_native()
import torch
z = torch.randn(3, 37); y = torch.tensor([0, 5, 36])
mx = mod.stats_and_grad(z.clone(), y, None, None, 0.0, 0.0, 3)[0]
print("@@" + str(tuple(mx.shape) == (3,) and bool(torch.equal(mx, z.max(1).values))))
"""


def test_a_compiler_without_openmp_gets_a_single_threaded_build(tmp_path):
    """Where the OpenMP flag fails (clang++ without libomp), the kernels are built again without
    it, and the build says so, instead of the native backend becoming unavailable."""
    p = _run(NO_OPENMP, {"XTF_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "@@True" in p.stdout
    assert "-fno-such-openmp-flag failed" in p.stderr and "building without OpenMP" in p.stderr
