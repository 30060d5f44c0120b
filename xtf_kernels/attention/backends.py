"""Registry of the attention-received implementations, like the masked_ce backends'.

Every implementation is a function with the signature of
:func:`~xtf_kernels.attention.torch_impl.attend_torch`
``(q, k, v, valid, docs, *, scale, causal, window, softcap, block, received)
-> (output or None, fp32 [B, Hq, L] summed received mass or None)``, imported on first use so
that a missing Triton only matters when the Triton implementation is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

import torch

from ._common import ATTN_BACKENDS

AttendFn = Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]

# name -> (module, attend function, availability function or None when always available)
_IMPLS: dict[str, tuple[str, str, str | None]] = {
    "torch": ("xtf_kernels.attention.torch_impl", "attend_torch", None),
    "triton": ("xtf_kernels.attention.triton_impl", "attend_triton", "available"),
}

__all__ = ["AttendFn", "attention_backend_status", "load_attend", "resolve_attend"]


@cache
def load_attend(name: str) -> AttendFn:
    """The attend function of the implementation called ``name`` (imported on first use)."""
    if name not in _IMPLS:
        raise ValueError(f"backend: expected one of {tuple(_IMPLS)}, got {name!r}")
    mod_name, fn_name, _ = _IMPLS[name]
    return getattr(importlib.import_module(mod_name), fn_name)


def _available(name: str, device: torch.device) -> tuple[bool, str]:
    mod_name, _, check = _IMPLS[name]
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # Triton not installed: a reason, not a crash
        return False, f"{type(exc).__name__}: {exc}"
    return (True, "") if check is None else getattr(mod, check)(device)


def attention_backend_status(device: torch.device | str = "cpu") -> dict[str, tuple[bool, str]]:
    """{name: (can run on ``device``, reason when not)} for every implementation."""
    dev = torch.device(device)
    return {name: _available(name, dev) for name in _IMPLS}


def resolve_attend(backend: str, device: torch.device) -> tuple[str, AttendFn]:
    """(concrete name, attend function) for ``backend`` on ``device``.

    ``"auto"`` picks Triton on a CUDA device where it can run, else torch. A concrete name that
    cannot run on ``device`` raises a RuntimeError saying why, here, at resolution (as
    :func:`xtf_kernels.backends.resolve_backend` does for the masked_ce backends).
    """
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"backend: expected one of {ATTN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _available("triton", device)[0] else "torch"
    else:
        ok, why = _available(backend, device)
        if not ok:
            raise RuntimeError(f"backend={backend!r} is not available here: {why}")
    return backend, load_attend(backend)
