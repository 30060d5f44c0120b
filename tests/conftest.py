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
# native builds for every ISA, subprocesses that import everything, Triton's interpreter on the
# CPU), measured with ``--durations`` (issue 17, item 14). CI runs them all; ``python -m pytest
# -q -m "not slow" tests`` is the quick loop for day-to-day work (README, "Set-up").
# tests/e2e/ marks itself; a test marked ``distributed`` is slow too.
SLOW_MODULES = {
    "tests/backends/test_native_isa.py",  # compiles the native kernels once per ISA
    "tests/integrations/test_integrations_distributed.py",
    "tests/integrations/test_integrations_trainers.py",
    "tests/integrations/test_packing_training.py",
    "tests/masked_ce/test_compile.py",
    "tests/masked_ce/test_grad_filter_training.py",  # 240 steps of a tiny Llama
    "tests/test_readme.py",
    "tests/xtf/test_xtf_distributed.py",
}
#: single slow tests (every parametrisation), as ``path::function``
SLOW_TESTS = {
    "tests/backends/test_native_backend.py::test_info_reports_every_backend",
    "tests/backends/test_native_backend.py::test_unavailable_native_falls_back_with_one_warning",
    "tests/backends/test_native_backend.py::test_a_compiler_without_openmp_gets_a_single_threaded_build",
    "tests/integrations/test_integrations_units.py::test_example_train_loop_runs_and_learns",
    "tests/masked_ce/test_masked_ce_api.py::test_no_full_logits_tensor_is_allocated",
    "tests/masked_ce/test_masked_ce_core.py::test_backward_uses_the_options_of_its_forward",
    "tests/xtf/test_attention_documents.py::test_collector_on_packed_rows_equals_documents_alone",
    "tests/xtf/test_attention_documents.py::test_triton_backend_skips_other_documents",
    "tests/xtf/test_attention_received.py::test_collector_matches_eager_attention",
    "tests/xtf/test_xtf_files.py::test_created_files_follow_the_umask",
    "tests/xtf/test_xtf_files.py::test_overwrite_deletes_only_what_xtf_wrote",
    "tests/xtf/test_xtf_pipeline.py::test_resume_after_interrupt_gives_identical_files",
    "tests/xtf/test_xtf_readings.py::test_readings_enter_the_fingerprint_and_resume",
}
#: slow only without CUDA, where Triton runs in its interpreter (so are the ``triton``
#: parametrisations of every other test)
SLOW_WITHOUT_CUDA_MODULES = {"tests/backends/test_triton_backend.py"}


def _is_slow(item, path: str) -> bool:
    if path in SLOW_MODULES or f"{path}::{item.originalname}" in SLOW_TESTS:
        return True
    if item.get_closest_marker("distributed"):
        return True
    if _cuda:
        return False
    params = getattr(getattr(item, "callspec", None), "params", {})
    return path in SLOW_WITHOUT_CUDA_MODULES or "triton" in [v for v in params.values() if isinstance(v, str)]


def pytest_collection_modifyitems(config, items):
    root = config.rootpath
    for item in items:
        path = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        if _is_slow(item, path):
            item.add_marker(pytest.mark.slow)
