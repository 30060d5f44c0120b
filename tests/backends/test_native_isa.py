"""Every code path of the native row kernels, tested on this machine.

The native build targets the host (``-march=native``); ``XTF_NATIVE_ISA`` / ``load_native(isa=)``
selects the other paths this CPU can run (AVX-512, AVX2, the base ISA), so a machine with
AVX-512 also tests the AVX2 and SSE2 code, and an AVX2-only machine the SSE2 code. Each path is
checked against a float64 reference (statistics and gradient, odd vocabulary sizes that leave
partial lane groups, -inf / huge / NaN logits, fp16 subnormals and infinities) and against the
host build.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xtf_kernels
from tests._reference import absolute_stats
from xtf_kernels.backends import ForwardOut

REPO = Path(__file__).resolve().parents[2]
NATIVE_OK, NATIVE_WHY = xtf_kernels.backend_status().get("native", (False, "not registered"))
pytestmark = pytest.mark.skipif(not NATIVE_OK, reason=f"native backend unavailable: {NATIVE_WHY}")


def _isas() -> list[str]:
    from xtf_kernels._native_build import available_isas

    return available_isas()


def _load(isa: str):
    """The extension for ``isa``; skips only where the compiler does not know the path's -march."""
    from xtf_kernels._native_build import load_native

    try:
        return load_native(isa=isa)
    except RuntimeError as exc:
        if isa != "native" and "x86-64-v" in str(exc) and ("bad value" in str(exc) or "unrecognized" in str(exc)):
            pytest.skip(f"this compiler cannot target {isa}: {str(exc)[:200]}")
        raise


@pytest.fixture(scope="module", params=_isas())
def ext(request):
    return _load(request.param)


def _ref(raw, y, bias, cap, ls, zl):
    """float64 statistics and d loss / d raw of every row."""
    r = raw.double() + (0 if bias is None else bias.double())
    z = cap * torch.tanh(r / cap) if cap is not None else r
    lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    ent = lse - torch.where(p > 0, p * z, torch.zeros_like(p)).sum(1)
    g = p * (1 + 2 * zl * lse)[:, None] - ls / z.shape[1]
    g[torch.arange(len(y)), y] -= 1 - ls
    if cap is not None:
        g = g * (1 - (z / cap) ** 2)
    return lse, z.gather(1, y[:, None])[:, 0], ent, z.sum(1), g


@pytest.mark.parametrize("V", [1, 3, 7, 17, 257, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap,bias,ls,zl", [(None, False, 0.0, 0.0), (5.0, True, 0.1, 1e-3)])
def test_stats_and_grad_match_float64(ext, V, dtype, cap, bias, ls, zl):
    g = torch.Generator().manual_seed(V)
    R = 5
    raw = (torch.randn(R, V, generator=g) * 4 + 3).to(dtype)  # an offset: mean_logit far from 0
    y = torch.randint(0, V, (R,), generator=g)
    b = torch.randn(V, generator=g) if bias else None
    lse, gold, ent, zs, grad = _ref(raw.float(), y, b, cap, ls, zl)
    z = raw.clone()
    out = ext.stats_and_grad(z, y, b, cap, ls, zl, 3)
    ours = absolute_stats(ForwardOut(*out, None, None, None), V)
    for name, ref in zip(("lse", "gold", "entropy", "mean_logit"), (lse, gold, ent, zs / V)):
        torch.testing.assert_close(ours[name], ref, rtol=2e-6, atol=2e-6, msg=name)
    gtol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    torch.testing.assert_close(z[:3].double(), grad[:3], rtol=gtol, atol=gtol)
    assert torch.equal(z[3:], raw[3:])


def test_sums_keep_precision_where_fp32_sequential_sums_do_not(ext):
    """1 + 512 e^-10 summed in lanes: the log-prob relative to the max to 1e-6 (was 9e-6 off)."""
    V = 513
    raw = torch.full((2, V), -1e4)
    raw[0, 7] = -9990.0
    raw[1] = torch.linspace(-3, 3, V) + 1e4  # a huge common offset
    y = torch.tensor([7, 100])
    mx, lse_r, gold_r, ent, zs = ext.stats_and_grad(raw.clone(), y, None, None, 0.0, 0.0, 0)
    assert (gold_r - lse_r)[0].item() == pytest.approx(-math.log1p(512 * math.exp(-10)), abs=1e-6)
    ref = torch.log_softmax(raw[1].double(), 0)[100].item()
    assert (gold_r - lse_r)[1].item() == pytest.approx(ref, abs=1e-6)
    assert (mx + zs / V)[1].item() == pytest.approx(raw[1].double().mean().item(), abs=1e-3)


def test_extreme_logits(ext):
    V = 37
    raw = torch.zeros(4, V)
    raw[0, 5] = 1e4
    raw[1, :30] = float("-inf")  # vocabulary masking: 0 log 0 = 0
    raw[2, 3] = float("nan")
    raw[3] = float("-inf")
    raw[3, 36] = 0.0  # the only finite logit sits in the partial lane group
    y = torch.tensor([5, 31, 0, 36])
    mx, lse_r, gold_r, ent, _ = ext.stats_and_grad(raw.clone(), y, None, None, 0.0, 0.0, 0)
    assert (mx + lse_r)[0].item() == pytest.approx(1e4) and abs(ent[0].item()) < 1e-3
    assert lse_r[1].item() == pytest.approx(math.log(7), abs=1e-6)
    assert ent[1].item() == pytest.approx(math.log(7), abs=1e-6)
    assert torch.isnan(lse_r[2])
    assert lse_r[3].item() == 0.0 and ent[3].item() == 0.0 and gold_r[3].item() == 0.0


@pytest.mark.parametrize("bias,ls,zl", [(False, 0.0, 0.0), (True, 0.1, 1e-3)])
def test_kept_exp_gradient_equals_the_recomputed_one(ext, bias, ls, zl):
    """fp32 rows without a softcap keep exp(z - max) from the statistics sweep for their
    gradient (one exp per logit): bit for bit what the vocabulary-block recompute
    (``grad_block_``, which takes every exp again) writes, bias gradient included, also with
    -inf logits, a huge offset and partial lane groups; and within fp32 of float64."""
    V = 1003
    g = torch.Generator().manual_seed(11)
    raw = torch.randn(6, V, generator=g) * 5
    raw[1, :500] = float("-inf")
    raw[2] += 1e4
    raw[3, -1] = 40.0  # the maximum in the last, partial lane group
    y = torch.tensor([0, 700, 5, V - 1, 17, 999])
    b = torch.randn(V, generator=g) if bias else None
    kept, db_kept = raw.clone(), torch.zeros(V)
    mx, lse_r = ext.stats_and_grad(kept, y, b, None, ls, zl, 6, db_kept)[:2]
    again, db_again = raw.clone(), torch.zeros(V)
    ext.grad_block_(again, y, mx, lse_r, None, b, 0, V, None, ls, zl, db_again)
    assert torch.equal(kept, again) and torch.equal(db_kept, db_again)
    grad = _ref(raw, y, b, None, ls, zl)[4]
    # the peers' criterion: no further from float64 than PyTorch's own fp32 (raw + bias in
    # fp32 loses ~1e-3 at the 1e4 offset), plus 2e-6 (the gold column takes its z = raw + bias
    # in double, the log-sum-exp the fp32 sums: ~1e-6 apart at z = 40)
    z32 = raw if b is None else raw + b
    lse32 = torch.logsumexp(z32, 1, keepdim=True)
    torch32 = torch.softmax(z32, 1) * (1 + 2 * zl * lse32) - ls / V
    torch32[torch.arange(6), y] -= 1 - ls
    assert ((kept.double() - grad).abs() <= (torch32.double() - grad).abs() + 2e-6).all()
    # a masked logit has exactly no softmax gradient: only label smoothing's -ls / V
    assert (kept[1, :500] == -(torch.tensor(ls, dtype=torch.float32) / V)).all()


def test_half_inputs_convert_exactly(ext):
    """fp16 subnormals, normals, the largest finite values and infinities load exactly (bit
    tricks): one value per row, whose maximum is the value itself."""
    vals = [6e-8, 1.5e-7, 3e-5, -6e-5, 2.0**-14, -(2.0**-20), 1.0, -2.5, 0.0, -0.0, 65504.0, -65504.0, 1000.5]
    raw = torch.tensor(vals + [math.inf, -math.inf], dtype=torch.float16)[:, None]
    y = torch.zeros(len(raw), dtype=torch.long)
    mx, lse_r, gold_r, ent, zs = ext.stats_and_grad(raw.clone(), y, None, None, 0.0, 0.0, 0)
    assert torch.equal(mx[: len(vals)], raw[: len(vals), 0].float())
    flush = torch.set_flush_denormal(True)  # denormals-are-zero: fp16 subnormals still load exactly
    try:
        mx_daz = ext.stats_and_grad(raw.clone(), y, None, None, 0.0, 0.0, 0)[0]
    finally:
        torch.set_flush_denormal(False)
    if flush:
        assert torch.equal(mx_daz[: len(vals)], raw[: len(vals), 0].float())
    assert torch.equal(lse_r[: len(vals)], torch.zeros(len(vals))) and torch.equal(gold_r[: len(vals)], lse_r[: len(vals)])
    assert mx[-2].item() == math.inf and mx[-1].item() == -math.inf and lse_r[-2:].isnan().all()


def test_half_gradient_rounds_to_nearest_even(ext):
    """The gradient written into bf16 / fp16 logits equals torch's rounding of the fp32 one."""
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(4, 1001, generator=g) * 6
    y = torch.randint(0, 1001, (4,), generator=g)
    z32 = raw.clone()
    ext.stats_and_grad(z32, y, None, None, 0.0, 0.0, 4)
    for dt in (torch.bfloat16, torch.float16):
        zh = raw.to(dt)
        zf = zh.float()
        ext.stats_and_grad(zf, y, None, None, 0.0, 0.0, 4)
        ext.stats_and_grad(zh, y, None, None, 0.0, 0.0, 4)
        assert torch.equal(zh, zf.to(dt))


def test_every_path_agrees_with_the_host_build(ext):
    from xtf_kernels._native_build import load_native

    host = load_native(isa="native")
    g = torch.Generator().manual_seed(9)
    raw = torch.randn(6, 4099, generator=g) * 3
    y = torch.randint(0, 4099, (6,), generator=g)
    b = torch.randn(4099, generator=g)
    a, h = raw.clone(), raw.clone()
    out_a = ext.stats_and_grad(a, y, b, 20.0, 0.05, 1e-3, 6)
    out_h = host.stats_and_grad(h, y, b, 20.0, 0.05, 1e-3, 6)
    for u, v in zip(out_a, out_h):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a, h, rtol=1e-6, atol=1e-9)
    x = torch.linspace(-300, 300, 1037)
    torch.testing.assert_close(ext.softcap_values(x, 30.0), host.softcap_values(x, 30.0), rtol=1e-6, atol=1e-6)


def test_unknown_isa_is_refused_by_name():
    from xtf_kernels._native_build import load_native

    with pytest.raises(ValueError, match="isa: expected one of native, avx512, avx2, baseline"):
        load_native(isa="sse9")
    env = {**os.environ, "XTF_NATIVE_ISA": "sse9"}
    code = "import xtf_kernels; print(xtf_kernels.backend_status()['native'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "XTF_NATIVE_ISA: expected one of" in out.stdout


@pytest.mark.parametrize("isa", _isas())
def test_forced_path_runs_masked_ce(isa):
    """XTF_NATIVE_ISA=<path> end to end (bias and softcap): loss and the gradients of hidden,
    weight and bias agree with the torch backend."""
    code = (
        "import torch; from xtf_kernels import masked_ce; from xtf_kernels._native_build import load_native\n"
        f"assert load_native().build_info() == load_native(isa={isa!r}).build_info()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h = torch.randn(37, 24, generator=g, requires_grad=True)\n"
        "w = torch.randn(1003, 24, generator=g, requires_grad=True)\n"
        "b = torch.randn(1003, generator=g, requires_grad=True)\n"
        "y = torch.randint(0, 1003, (37,), generator=g); y[::5] = -100\n"
        "out = []\n"
        "for be in ('native', 'torch'):\n"
        "    loss = masked_ce(h, w, y, bias=b, softcap=20.0, backend=be)\n"
        "    out.append((loss, *torch.autograd.grad(loss, (h, w, b))))\n"
        "for u, v, tol in zip(out[0], out[1], (1e-6, 1e-5, 1e-5, 1e-5)):\n"
        "    torch.testing.assert_close(u, v, rtol=tol, atol=tol * 1e-2)\n"
        "print('ok', load_native().build_info())\n"
    )
    env = {**os.environ, "XTF_NATIVE_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout and "lanes=" in out.stdout
