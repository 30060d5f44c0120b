"""Process-wide tuning options of the kernels (none of them change results beyond rounding).

A leaf module. :func:`~xtf_kernels.masked_ce` reads the options once per call, when its forward
runs, into its :class:`~xtf_kernels.MaskedCESpec`; the backward uses that copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

#: default fp32 logits elements held at once (64 MiB); the one default of ``chunk_elems``
DEFAULT_CHUNK_ELEMS = 1 << 24

_OFF = ("0", "false", "off", "no")


def _env_check_labels() -> bool:
    """``XTF_CHECK_LABELS`` as read now: on unless set to 0 / false / off / no."""
    return os.environ.get("XTF_CHECK_LABELS", "1").strip().lower() not in _OFF


@dataclass(frozen=True)
class Options:
    """Tuning knobs read by every :func:`~xtf_kernels.masked_ce` call.

    Attributes:
        grad_in_forward: compute the gradient during the forward when the keep mask is known
            up front and the upstream gradient is a scalar (reduction "mean"/"sum"): three
            GEMMs per kept row instead of four, at the price of holding dX and an fp32 dW
            ([V, D]) from the forward to the backward. False: recompute the logits in the
            backward (lower peak memory at large V, one more GEMM).
            Does not apply under ``torch.compile``: the custom-op path always recomputes
            (its forward op returns no gradient state, by design).
        chunk_elems: fp32 logits elements held at once (rows x vocab) by the chunked backends
            (default :data:`DEFAULT_CHUNK_ELEMS`); the native CPU backend's gradient sweep holds
            up to twice as many when the fp32 dW it sums into (``V * D``) is that large.
        check_labels: check on the device that labels lie in [0, V) (an async device
            assert on GPU, a plain check on CPU). None (the default): read the environment
            variable ``XTF_CHECK_LABELS`` when :func:`get_options` is called (``0``, ``false``,
            ``off`` or ``no`` turn the check off), so setting it after import counts.
        grad_filter: the default of :func:`~xtf_kernels.masked_ce`'s ``grad_filter`` (None:
            exact gradients; ``"auto"``, a float threshold or a
            :class:`~xtf_kernels.GradFilter`: negligible vocabulary columns skipped in the
            backward, see :mod:`xtf_kernels.grad_filter`). Unlike the other options it changes
            gradients beyond rounding; a call's own ``grad_filter=`` wins, ``0.0`` forces exact.

    Under ``torch.compile`` the options are read when the graph is traced; Dynamo retraces
    when :func:`options` / :func:`set_options` change them (not when the environment changes).
    """

    grad_in_forward: bool = True
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    check_labels: bool | None = None
    grad_filter: object = None


_local = threading.local()
_default = Options()


def get_options() -> Options:
    """The options in force on this thread (``check_labels`` resolved to a bool)."""
    opts = getattr(_local, "opts", _default)
    if opts.check_labels is None:
        opts = dataclasses.replace(opts, check_labels=_env_check_labels())
    return opts


def set_options(**changes: object) -> Options:
    """Change the process-wide defaults; returns the new options."""
    global _default
    _default = dataclasses.replace(_default, **changes)
    return _default


@contextlib.contextmanager
def options(**changes: object) -> Iterator[Options]:
    """Temporarily change options on this thread: ``with xtf_kernels.options(chunk_elems=2**20):``."""
    old = getattr(_local, "opts", None)
    _local.opts = dataclasses.replace(getattr(_local, "opts", _default), **changes)
    try:
        yield _local.opts
    finally:
        if old is None:
            del _local.opts
        else:
            _local.opts = old
