"""Backend registry: every backend implements :class:`~xtf_kernels.backends.base.Backend`.

Backends are imported lazily so that a missing optional dependency (Triton, a C++ compiler)
only matters when that backend is asked for.
"""

from __future__ import annotations

import importlib
import warnings
from functools import cache

import torch

from .base import Backend, CEConfig, ForwardOut, GradOut

BACKENDS = ("auto", "triton", "torch", "native")

_MODULES = {
    "torch": ("xtf_kernels.backends.torch_backend", "TorchBackend"),
    "triton": ("xtf_kernels.backends.triton_backend", "TritonBackend"),
    "native": ("xtf_kernels.backends.native_backend", "NativeBackend"),
}


@cache
def load_backend(name: str) -> Backend:
    """The backend object called ``name`` (imported on first use)."""
    if name not in _MODULES:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    mod_name, cls_name = _MODULES[name]
    mod = importlib.import_module(mod_name)
    return getattr(mod, cls_name)()


def backend_status() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason when not)} for every concrete backend."""
    out: dict[str, tuple[bool, str]] = {}
    for name in _MODULES:
        try:
            out[name] = load_backend(name).available()
        except Exception as exc:  # an import error is a reason, not a crash
            out[name] = (False, f"{type(exc).__name__}: {exc}")
    return out


_warned: set[str] = set()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """Pick the backend for ``name`` ("auto" or concrete) and tensors of ``device``/``dtype``.

    A concrete name that cannot run here raises a RuntimeError that says why. ``"auto"``
    picks Triton on a GPU, else the native CPU backend, else the torch backend.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name != "auto":
        try:
            be = load_backend(name)
            ok, why = be.available()
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            raise RuntimeError(f"backend={name!r} is not available here: {why}")
        ok, why = be.supports(device, dtype)
        if not ok:
            raise RuntimeError(f"backend={name!r} cannot run {dtype} tensors on {device}: {why}")
        return be
    candidates = ("triton", "torch") if device.type == "cuda" else ("native", "torch")
    for cand in candidates:
        try:
            be = load_backend(cand)
            ok, why = be.available()
            if ok:
                ok, why = be.supports(device, dtype)
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok:
            return be
        if cand != "torch" and cand not in _warned:
            _warned.add(cand)
            warnings.warn(
                f"xtf_kernels: backend {cand!r} unavailable ({why}); falling back to the torch "
                "backend. `python -m xtf_kernels.info` lists the backends.",
                RuntimeWarning,
                stacklevel=3,
            )
    return load_backend("torch")


__all__ = [
    "BACKENDS",
    "Backend",
    "CEConfig",
    "ForwardOut",
    "GradOut",
    "backend_status",
    "load_backend",
    "resolve_backend",
]
