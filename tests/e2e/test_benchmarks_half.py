"""The bf16 epilogue benchmarks: the S2-bias-cap row's plumbing and benchmarks/half_epilogue_cpu.py."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import half_epilogue_cpu as hec
from benchmarks import masked_ce as bm


def test_bias_row_is_planned_and_builds():
    sh = bm.CPU_SHAPES["S2-bias-cap"]
    assert sh.bias and sh.softcap == 30.0 and sh.dtype == "bfloat16"
    tiny = bm.Shape("t", 12, 16, 50, "bfloat16", softcap=30.0, logits="random", bias=True)
    for method in ("xtf-torch", "eager", "gemm-floor"):
        _, fwd, kept = bm.build(bm.Case(tiny, "plain", method), "cpu")
        h, w, _ = bm.make_inputs(tiny, "cpu")
        loss = fwd(h.clone().requires_grad_(), w.clone().requires_grad_())
        assert math.isfinite(float(loss)) and kept > 0
    # xtf and eager agree on the biased, softcapped loss (eager rounds GEMM + bias to bf16)
    h, w, y = bm.make_inputs(tiny, "cpu")
    losses = [float(bm.build(bm.Case(tiny, "plain", m), "cpu")[1](h, w)) for m in ("xtf-torch", "eager")]
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)
    with pytest.raises(RuntimeError, match="bias row compares xtf with eager only"):
        bm.build(bm.Case(tiny, "plain", "cce"), "cpu")


def test_half_epilogue_script_on_tiny_shapes():
    rows = hec.speed(rows=4, reps=1, D=64, V=1000)
    by = {r["route"]: r for r in rows}
    assert by["bf16-mm"]["vs_bf16_mm"] == 1.0
    for name in ("fp32-upcast", "bf16-2gemm"):  # exact or nearly: far below bf16 rounding
        assert by[name]["max_abs_err"] < by["bf16-mm"]["max_abs_err"] / 10
    assert "seconds" in by["mm-out_dtype"] or by["mm-out_dtype"]["note"].startswith("unavailable")
    errs = {r["route"]: r for r in hec.error(N=16, D=32, V=300)}
    fp32 = errs["fp32 logits (torch / Triton on CUDA)"]
    assert fp32["lse_max"] < 1e-5 and fp32["logprob_max"] < 1e-5
    for be in ("xtf native", "xtf torch"):  # CPU default: fp32 GEMM output, as exact as fp32 logits
        if be in errs:
            assert errs[be]["lse_max"] < 1e-5 and errs[be]["logprob_max"] < 1e-5
            rounded = errs[f"{be}, XTF_CPU_HALF_GEMM=half"]  # opt-in: bf16 output before the epilogue
            assert 1e-5 < rounded["lse_max"] < 0.2
    assert torch.isfinite(torch.tensor([errs[k]["lse_mean"] for k in errs])).all()
