"""Triton backend of masked CE: fused statistics kernel + Liger-style gradient in the forward.

Importing this module never needs Triton: the kernels (:mod:`._triton.kernels`) are imported
on first use, and :meth:`TritonBackend.available` says why they cannot run where they cannot.

Its primitives for the driver (:mod:`.driver`; the design is in ``docs/triton.md``):

* ``fused_stats``: statistics with no logits in memory (one fused GEMM kernel), used for the
  rows without a gradient (the scoring / select pass, the masked rows after the kept ones);
* ``stats_and_grad_`` / ``row_grad_`` / ``row_stats``: the row kernel on a logits buffer
  filled by ``torch.mm`` (the statistics, and the buffer overwritten with
  ``d(loss)/d(raw logits)``); half-precision inputs with a bias or softcap get an fp32 logits
  buffer (cuBLAS' fp32-output GEMM) and the gradient goes to a half buffer, so the epilogue
  never sees rounded logits.

Plan policy: a gradient needing more than one row chunk takes the statistics first and then
the vocabulary-blocked recompute (``chunked_grad="recompute"``): on a GPU the fp32 ``[V, D]``
read-modify-write per chunk costs more than the extra logits GEMM.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .._env import triton_interpret
from ._gemm import f32_epilogue
from .base import CEConfig, RowStats
from .driver import DriverBackend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_kernels: ModuleType | None = None


def _load_kernels() -> ModuleType:
    """The kernel module (imports triton on first call)."""
    global _kernels
    if _kernels is None:
        from ._triton import kernels

        _kernels = kernels
    return _kernels


#: how the statistics of rows without a gradient are computed on CUDA: "cublas" (row chunks of
#: logits by torch.mm, then the row kernel) or "fused" (the Triton GEMM kernel, no logits in
#: memory). The interpreter always uses "fused". A tuning knob, not API.
STATS_MODE = "cublas"


def _stats_buffer(M: int, device: torch.device) -> tuple[torch.Tensor, RowStats]:
    """The kernels' packed fp32 ``[5, M]`` statistics buffer (rows in :class:`RowStats` field
    order, the layout ``_triton.kernels`` writes) and its named views."""
    buf = torch.empty(len(RowStats._fields), M, dtype=torch.float32, device=device)
    return buf, RowStats(*buf.unbind(0))


class TritonBackend(DriverBackend):
    """Masked-CE backend on Triton kernels (see :mod:`xtf_kernels.backends.base`)."""

    name = "triton"
    chunked_grad = "recompute"
    cpu_fp32 = False

    def available(self) -> tuple[bool, str]:
        """(usable here?, reason when not): needs triton and a CUDA device or the interpreter."""
        try:
            k = _load_kernels()
        except Exception as exc:  # ImportError, or a broken triton install
            return False, f"triton cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
        if k.INTERPRETED:
            return True, ""
        if torch.cuda.is_available():
            return True, ""
        if triton_interpret():
            return False, ("TRITON_INTERPRET=1 was set after the Triton kernels were created; set it "
                           "before importing xtf_kernels' triton backend")
        return False, ("no CUDA device; set TRITON_INTERPRET=1 before importing triton to run the "
                       "kernels in Triton's CPU interpreter (slow; for tests)")

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        """Whether tensors of ``device`` / ``dtype`` can run: CUDA fp32/fp16/bf16; CPU fp32/fp16
        only under the interpreter."""
        device = torch.device(device)
        if dtype not in _DTYPES:
            return False, f"dtype: expected one of {_DTYPES}, got {dtype}"
        ok, why = self.available()
        if not ok:
            return False, why
        interp = _load_kernels().INTERPRETED
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and interp:
            if dtype == torch.bfloat16:
                return False, ("bfloat16 on the CPU interpreter: its tl.dot multiplies the raw bf16 "
                               "bits (triton issue 11584); use fp32/fp16 or a CUDA device")
            return True, ""
        return False, (f"device: Triton runs CUDA tensors (CPU tensors only under "
                       f"TRITON_INTERPRET=1), got {device}")

    # ------------------------------------------------------------------ primitives
    def logits_dtype(self, x: torch.Tensor, b: torch.Tensor | None, cfg: CEConfig) -> torch.dtype:
        """fp32 for half-precision inputs with a bias or softcap (the epilogue then never sees
        rounded logits; cuBLAS' fp32-output GEMM), else ``x.dtype``."""
        return torch.float32 if f32_epilogue(x.dtype, b is not None, cfg.softcap) else x.dtype

    def row_stats(self, z, y, b, cfg: CEConfig) -> RowStats:
        """Statistics of the raw logits ``z`` ``[r, V]`` by the row kernel."""
        buf, st = _stats_buffer(z.shape[0], z.device)
        _load_kernels().rows_stats(z, b, y, softcap=cfg.softcap, stats_out=buf)
        return st

    def stats_and_grad_(self, z, y, b, cfg: CEConfig, out, db) -> RowStats:
        """Statistics and the unit-upstream gradient of whole rows, one kernel launch."""
        buf, st = _stats_buffer(z.shape[0], z.device)
        _load_kernels().rows_stats_grad(z, b, y, stats_out=buf, out=out, **_opts(cfg))
        if db is not None:
            db += out.sum(0, dtype=torch.float32)
        return st

    def row_grad_(self, z, y, row_max, lse, scale, b, db, v0: int, vocab_start: int, vocab: int,
                  cfg: CEConfig, out) -> None:
        """``out`` := the gradient of the columns ``[v0, v0 + C)`` (driver contract)."""
        C = z.shape[1]
        _load_kernels().rows_grad(z, None if b is None else b[v0:v0 + C], y, row_max=row_max, lse=lse,
                                  row_scale=scale, v_off=vocab_start + v0, vocab=vocab, out=out, **_opts(cfg))
        if db is not None:
            db[v0:v0 + C] += out.sum(0, dtype=torch.float32)

    def fused_stats(self, x, w, b, y, cfg: CEConfig) -> RowStats | None:
        """Statistics with no logits in memory (the fused GEMM kernel), where :data:`STATS_MODE`
        and the device call for it; else None (the driver's logits chunks + :meth:`row_stats`)."""
        k = _load_kernels()
        if not (k.INTERPRETED or not x.is_cuda or STATS_MODE == "fused"):
            return None
        buf, st = _stats_buffer(x.shape[0], x.device)
        k.fused_stats(x, w, b, y, cfg.softcap, buf)
        return st


def _opts(cfg: CEConfig) -> dict:
    return dict(softcap=cfg.softcap, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)
