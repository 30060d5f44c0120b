"""Environment switches read by more than one module (a leaf: imports nothing of the package).

Read at call time, never at import time, so setting a variable after ``import xtf_kernels``
still counts.
"""

from __future__ import annotations

import os

__all__ = ["TRUTHY", "cpu_half_gemm", "env_flag", "triton_interpret"]

#: values that turn a boolean switch on (case and surrounding spaces ignored), as Triton reads them
TRUTHY = ("1", "true", "on", "yes")


def env_flag(name: str, default: bool = False) -> bool:
    """Whether the environment variable ``name`` is set to one of :data:`TRUTHY` (``default`` if unset)."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in TRUTHY


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run its kernels in the CPU interpreter."""
    return env_flag("TRITON_INTERPRET")


#: values of ``XTF_CPU_HALF_GEMM``
CPU_HALF_GEMMS = ("fp32", "half")


def cpu_half_gemm() -> str:
    """``XTF_CPU_HALF_GEMM``: how bf16 / fp16 inputs run their GEMMs on the CPU.

    ``"fp32"`` (default): the operands are upcast and every GEMM runs in fp32 (fp32 logits;
    on CPUs without a native half-precision dot product, such as AVX2, also the fastest
    route). ``"half"``: GEMMs in the input dtype, the logits rounded to it before the
    log-sum-exp (the pre-0.9 behaviour; fails the peers' fp32-logits accuracy criterion).

    Raises:
        ValueError: naming the variable, for any other value.
    """
    value = os.environ.get("XTF_CPU_HALF_GEMM", "").strip().lower() or "fp32"
    if value not in CPU_HALF_GEMMS:
        raise ValueError(f"XTF_CPU_HALF_GEMM: expected one of {', '.join(CPU_HALF_GEMMS)}, got {value!r}")
    return value
