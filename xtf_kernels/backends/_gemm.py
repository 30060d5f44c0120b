"""GEMMs with an fp32 result for half-precision operands (shared by the torch and Triton backends).

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


def add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an accumulator ``acc`` (fp32, or ``a.dtype``) over chunks, the CPU
    backends' way: one ``addmm_`` when the dtypes match, else the ``a.dtype`` GEMM (fp32
    accumulation inside it, rounded once per chunk) added in ``acc.dtype`` (:func:`mm_f32`
    keeps that chunk unrounded instead, at fp32-GEMM cost off CUDA)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).to(acc.dtype)


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
