"""The GEMMs of the driver: :func:`acc_mm`, the one way a dX / dW partial sum is formed.

A bf16 / fp16 GEMM accumulates in fp32 and normally rounds its result to the operands'
dtype. Where an epilogue follows (bias, softcap) or partial sums are added up (dW, dx over
chunks), that rounding is avoidable: :func:`mm_f32` keeps the fp32 result, through cuBLAS'
fp32-output half GEMM on CUDA (``out_dtype=torch.float32``, same speed) and by upcasting
the operands elsewhere (exact: every product of two half values is exact in fp32, but an
fp32 GEMM; on the CPU, where ATen has no fp32-output half GEMM, that costs 2.3-4x the bf16
GEMM, so the CPU backends keep the rounded bf16 GEMM output; see ``docs/numerics.md``).
"""

from __future__ import annotations

import torch

from .._env import cpu_half_gemm

HALF = (torch.bfloat16, torch.float16)

#: which fp32-output half-precision GEMMs this torch has on CUDA (probed on first use)
_f32_gemm = {"addmm": True, "mm": True}


def f32_epilogue(dtype: torch.dtype, has_bias: bool, softcap: float | None) -> bool:
    """Whether half-precision logits should stay fp32 from the GEMM through the epilogue
    (where a fast fp32-output GEMM exists: see :func:`fast_f32_gemm`)."""
    return dtype in HALF and (has_bias or softcap is not None)


def fast_f32_gemm(device: torch.device) -> bool:
    """Whether a half-precision GEMM with an fp32 result runs at half-precision speed here
    (CUDA: cuBLAS; the CPU has none, ``docs/numerics.md``)."""
    return torch.device(device).type == "cuda"


def mm_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with fp32 accumulation; ``out`` is fp32 or ``a.dtype``.

    Half-precision inputs with an fp32 ``out`` use cuBLAS' fp32-output GEMM on CUDA (no
    rounding of partial sums; ``addmm`` where this torch has it, else ``mm`` into a temporary
    and an add); elsewhere the inputs are upcast (an fp32 GEMM: correct but slow).
    """
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if a.is_cuda and (not accumulate or _f32_gemm["addmm"]) and _f32_gemm["mm"]:
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError):  # this torch lacks that fp32-output GEMM
            _f32_gemm["addmm" if accumulate else "mm"] = False
    if a.is_cuda and accumulate and _f32_gemm["mm"]:
        try:
            out += torch.mm(a, b, out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError):
            _f32_gemm["mm"] = False
    if accumulate:
        out.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=out)


def acc_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b``: the one dX / dW / logits GEMM of the driver, ``out`` in ``a.dtype`` or a
    wider accumulator (fp32, fp64).

    Same dtypes: one ``mm`` / ``addmm_``. Half-precision ``a`` with an fp32 ``out``: on CUDA
    the fp32-output GEMM (:func:`mm_f32`); on the CPU the half GEMM rounded to ``a.dtype``
    and added when ``XTF_CPU_HALF_GEMM=half`` asked for speed, else exact fp32 products
    (:func:`mm_f32`'s upcast).
    """
    if out.dtype != a.dtype and not a.is_cuda and a.dtype in HALF and cpu_half_gemm() == "half":
        part = a @ b
        if accumulate:
            out += part.to(out.dtype)
        else:
            out.copy_(part)
        return
    mm_f32(out, a, b, accumulate)
