"""Single sources of truth shared by the framework modules (issue 11): the environment switch
helper, the attention-received registry, the LM-head description and the reason-bit names."""

from __future__ import annotations

import pytest
import torch

from xtf_kernels import _env
from xtf_kernels.attention import backends as attn_backends
from xtf_kernels.attention._common import ATTN_BACKENDS


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), (" On ", True), ("YES", True),
    ("0", False), ("", False), ("false", False), ("off", False), ("2", False),
])
def test_env_flag_accepts_1_true_on_yes(monkeypatch, value, expected):
    monkeypatch.setenv("XTF_TEST_FLAG", value)
    assert _env.env_flag("XTF_TEST_FLAG") is expected
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _env.triton_interpret() is expected


def test_env_flag_default_when_unset(monkeypatch):
    monkeypatch.delenv("XTF_TEST_FLAG", raising=False)
    assert _env.env_flag("XTF_TEST_FLAG") is False
    assert _env.env_flag("XTF_TEST_FLAG", default=True) is True


def test_attention_registry_matches_the_validated_names():
    assert set(ATTN_BACKENDS) == {"auto", *attn_backends.attention_backend_status()}
    with pytest.raises(ValueError, match="backend: expected one of"):
        attn_backends.resolve_attend("cuda", torch.device("cpu"))


def test_attention_auto_is_torch_on_cpu():
    from xtf_kernels.attention.torch_impl import attend_torch

    name, fn = attn_backends.resolve_attend("auto", torch.device("cpu"))
    assert name == "torch" and fn is attend_torch
    assert attn_backends.attention_backend_status("cpu")["torch"] == (True, "")


def test_attention_triton_status_follows_the_interpreter_switch(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "on")
    assert attn_backends.attention_backend_status("cpu")["triton"][0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = attn_backends.attention_backend_status("cpu")["triton"]
    assert not ok and "TRITON_INTERPRET" in why
