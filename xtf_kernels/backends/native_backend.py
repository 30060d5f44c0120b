"""Native CPU backend (``backend="native"``): the C++ row kernels of ``csrc/`` as the driver's
per-row primitives.

Division of labour: every GEMM is ATen's (oneDNN / MKL, through the driver); everything between
the GEMMs is one call into the compiled extension (:mod:`xtf_kernels._native_build`): one
vectorised pass over each row of a logits chunk (the rows spread over ATen's OpenMP threads) for
the statistics and, in place, the gradient (``stats_and_grad``; fp32 rows keep ``exp(z - max)``
from the statistics, so each logit costs one exp), or the gradient of a vocabulary block
(``grad_block_``).

Plan policy (:mod:`.driver`): a gradient over several row chunks sums dW in fp32
(``chunked_grad="accumulate"``), in chunks of up to twice ``chunk_elems`` logits when that
accumulator is at least as large (``chunk_up_to_dw``; at S1 4 chunks of 820 rows, 105 MB,
instead of 7 of 469, 60 MB; each chunk re-reads the head twice and dW once, about 1 % of the
step each);
half-precision inputs (``XTF_CPU_HALF_GEMM=half``) keep every
row's gradient logits when that costs no more than the fp32 ``[V, D]`` accumulator it replaces
(``keep_all_half``, e.g. S2: 420 MB instead of 1.05 GB), so dW is one GEMM accumulated in fp32
inside it and rounded once. The bias gradient is summed in fp32 inside the row kernel, before
the gradient logits are rounded to the input dtype. float64 (gradcheck) runs the torch
backend's primitives.
"""

from __future__ import annotations

import torch

from .base import CEConfig, RowStats
from .driver import DriverBackend
from .torch_backend import TorchBackend

_TORCH = TorchBackend()


def _ext():
    from .._native_build import load_native

    return load_native()


def _f32(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.float().contiguous()


class NativeBackend(DriverBackend):
    """C++/OpenMP CPU backend (see :mod:`.driver` for the primitives)."""

    name = "native"
    keep_all_half = True
    chunk_up_to_dw = True

    def available(self) -> tuple[bool, str]:
        """(True, build info) once the extension is compiled / loaded, else (False, why)."""
        from .._native_build import native_status

        ok, why = native_status()
        return (True, "") if ok else (False, why)

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        """CPU tensors of float32 / bfloat16 / float16 (float64 runs the torch primitives)."""
        if torch.device(device).type != "cpu":
            return False, "the native backend runs on the CPU only"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            return False, f"unsupported dtype {dtype}"
        return True, ""

    def row_stats(self, z, y, b, cfg: CEConfig) -> RowStats:
        """The C++ row kernel's five fp32 ``[r]`` statistics of ``z`` ``[r, V]``, named."""
        if z.dtype == torch.float64:
            return _TORCH.row_stats(z, y, b, cfg)
        return RowStats(*_ext().stats_and_grad(z, y, _f32(b), cfg.softcap, cfg.label_smoothing, cfg.z_loss, 0))

    def stats_and_grad_(self, z, y, b, cfg: CEConfig, out, db) -> RowStats:
        """One pass per row: statistics, and ``z`` (= ``out``) overwritten with the gradient."""
        if z.dtype == torch.float64:
            return _TORCH.stats_and_grad_(z, y, b, cfg, out, db)
        return RowStats(*_ext().stats_and_grad(z, y, _f32(b), cfg.softcap, cfg.label_smoothing, cfg.z_loss,
                                               z.shape[0], db))

    def row_grad_(self, z, y, row_max, lse, scale, b, db, v0: int, vocab_start: int, vocab: int,
                  cfg: CEConfig, out) -> None:
        """``z`` (= ``out``) := the gradient of the columns ``[v0, v0 + C)`` (driver contract)."""
        if z.dtype == torch.float64:
            return _TORCH.row_grad_(z, y, row_max, lse, scale, b, db, v0, vocab_start, vocab, cfg, out)
        C = z.shape[1]
        _ext().grad_block_(z, y if vocab_start == 0 else y - vocab_start, row_max, lse, scale, _f32(b), v0,
                           vocab, cfg.softcap, cfg.label_smoothing, cfg.z_loss,
                           None if db is None else db[v0:v0 + C])
        return None
