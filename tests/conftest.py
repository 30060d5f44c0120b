"""Shared test set-up.

Without a CUDA device the Triton kernels run in Triton's interpreter: TRITON_INTERPRET must
be set before triton is imported, so it is set here, first. The backends under test are
discovered from :func:`xtf_kernels.backend_status`, so a new backend is tested by the same
parametrised suite as soon as it reports itself available.
"""

from __future__ import annotations

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import xtf_kernels  # noqa: E402

DEVICE = "cuda" if _cuda else "cpu"


def available_backends() -> list[str]:
    status = xtf_kernels.backend_status()
    return [name for name in ("torch", "native", "triton") if status.get(name, (False, ""))[0]]


BACKENDS_UNDER_TEST = available_backends()


@pytest.fixture(params=BACKENDS_UNDER_TEST)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(request) -> str:
    """Where the tested backend runs: CUDA when present and the backend runs there, else CPU
    (the native backend is CPU-only; Triton runs on the CPU only in the interpreter)."""
    if DEVICE == "cuda" and "backend" in request.fixturenames:
        from xtf_kernels.backends import load_backend

        be = load_backend(request.getfixturevalue("backend"))
        if not be.supports(torch.device("cuda"), torch.float32)[0]:
            return "cpu"
    return DEVICE
