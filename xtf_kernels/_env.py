"""Environment switches read by more than one module (a leaf: imports nothing of the package).

Read at call time, never at import time, so setting a variable after ``import xtf_kernels``
still counts.
"""

from __future__ import annotations

import os

__all__ = ["TRUTHY", "env_flag", "triton_interpret"]

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
