"""The two backend registries (masked_ce's and attention-received's) behave alike: an unknown
name is a ValueError, a concrete backend that cannot run is a RuntimeError raised when it is
resolved (not later, when it is called), worded the same way (issue 19, item 4)."""

from __future__ import annotations

import pytest
import torch

from xtf_kernels import backends as ce_registry
from xtf_kernels.attention import backends as attn_registry
from xtf_kernels.attention import triton_impl

CPU = torch.device("cpu")
MISSING = "xtf_kernels._no_such_module"


@pytest.fixture
def fresh_caches():
    ce_registry.load_backend.cache_clear()
    attn_registry.load_attend.cache_clear()
    yield
    ce_registry.load_backend.cache_clear()
    attn_registry.load_attend.cache_clear()


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match="backend: expected one of"):
        ce_registry.resolve_backend("cuda", CPU, torch.float32)
    with pytest.raises(ValueError, match="backend: expected one of"):
        attn_registry.resolve_attend("cuda", CPU)


def test_a_backend_that_cannot_be_imported_fails_at_resolution(monkeypatch, fresh_caches):
    monkeypatch.setitem(ce_registry._MODULES, "triton", (MISSING, "TritonBackend"))
    monkeypatch.setitem(attn_registry._IMPLS, "triton", (MISSING, "attend_triton", "available"))
    want = r"backend='triton' is not available here: ModuleNotFoundError"
    with pytest.raises(RuntimeError, match=want):
        ce_registry.resolve_backend("triton", CPU, torch.float32)
    with pytest.raises(RuntimeError, match=want):
        attn_registry.resolve_attend("triton", CPU)


def test_a_backend_that_cannot_run_on_the_device_fails_at_resolution(monkeypatch):
    """Attention's Triton on the CPU without the interpreter: refused by resolve_attend (it was
    handed out and refused only when called)."""
    monkeypatch.setattr(triton_impl, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"backend='triton' is not available here: Triton needs"):
        attn_registry.resolve_attend("triton", CPU)
    assert attn_registry.resolve_attend("auto", CPU)[0] == "torch"
