"""What this machine and its libraries offer the pipeline: devices, the masked_ce backend, HF bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["check_device_available", "hf_progress", "prepare_backend"]


def check_device_available(dev: torch.device) -> None:
    """Raise a ValueError naming the device when this torch / machine cannot use it."""
    if dev.type == "cpu":
        return
    mod = getattr(torch, dev.type, None)
    if mod is None or not hasattr(mod, "is_available"):
        raise ValueError(f"device: {dev.type!r} is not supported here; use 'auto', 'cpu' or 'cuda[:N]'")
    if not mod.is_available():
        why = " (this torch was built without CUDA)" if dev.type == "cuda" and torch.version.cuda is None else ""
        raise ValueError(f"device: {str(dev)!r} requested, but no {dev.type.upper()} device is available{why}; "
                         "use 'cpu' or 'auto'")
    n = mod.device_count() if hasattr(mod, "device_count") else 1
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"device: {str(dev)!r} requested, but only {n} {dev.type} device(s) are visible")


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """Turn the Hugging Face progress bars (checkpoint loading) off inside the block when not ``enabled``."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def prepare_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Resolve (and on first use build) the masked_ce backend before anything is timed."""
    from ..backends import resolve_backend

    resolve_backend(backend, device, dtype)
