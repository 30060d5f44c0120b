"""Process-wide tuning options of the kernels (none of them change results beyond rounding)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """Tuning knobs read by every :func:`~xtf_kernels.masked_ce` call.

    Attributes:
        grad_in_forward: compute the gradient during the forward when the keep mask is known
            up front and the upstream gradient is a scalar (reduction "mean"/"sum"): three
            GEMMs per kept row instead of four, at the price of holding dX and an fp32 dW
            ([V, D]) from the forward to the backward. False: recompute the logits in the
            backward (lower peak memory at large V, one more GEMM).
        chunk_elems: fp32 logits elements held at once (rows x vocab) by the chunked backends.
        check_labels: check on the device that labels lie in [0, V) (an async device
            assert on GPU, a plain check on CPU). Env: XTF_CHECK_LABELS=0 turns it off.
    """

    grad_in_forward: bool = True
    chunk_elems: int = 1 << 24
    check_labels: bool = os.environ.get("XTF_CHECK_LABELS", "1") != "0"


_local = threading.local()
_default = Options()


def get_options() -> Options:
    """The options in force on this thread."""
    return getattr(_local, "opts", _default)


def set_options(**changes: object) -> Options:
    """Change the process-wide defaults; returns the new options."""
    global _default
    _default = dataclasses.replace(_default, **changes)
    return _default


@contextlib.contextmanager
def options(**changes: object) -> Iterator[Options]:
    """Temporarily change options on this thread: ``with xtf_kernels.options(chunk_elems=2**20):``."""
    old = getattr(_local, "opts", None)
    _local.opts = dataclasses.replace(get_options(), **changes)
    try:
        yield _local.opts
    finally:
        if old is None:
            del _local.opts
        else:
            _local.opts = old
