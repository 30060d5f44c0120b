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


# ``slow``: tests of more than about 5 s on 2 CPU cores (model training, torchrun, torch.compile,
# subprocesses that import everything). CI runs them all; ``python -m pytest -q -m "not slow"
# tests`` is the quick loop for day-to-day work (README, "Tests"). tests/e2e/ marks itself.
SLOW_MODULES = {
    "tests/integrations/test_integrations_distributed.py",
    "tests/integrations/test_integrations_trainers.py",
    "tests/integrations/test_packing_training.py",
    "tests/masked_ce/test_compile.py",
    "tests/test_readme.py",
    "tests/xtf/test_xtf_distributed.py",
}
#: single slow tests, by node id without the parameters
SLOW_TESTS: set[str] = set()


def pytest_collection_modifyitems(config, items):
    root = config.rootpath
    for item in items:
        path = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        if path in SLOW_MODULES or item.nodeid.split("[")[0] in SLOW_TESTS or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)
