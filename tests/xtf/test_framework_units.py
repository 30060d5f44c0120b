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


def _scaled_biased_lm(arch: str):
    """A tiny causal LM whose forward scales the logits (Granite: / logits_scaling; Cohere:
    * logit_scale), given an LM head with a bias: logits = scale * (h @ W.T + b)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=0)
    if arch == "granite":
        cfg = transformers.GraniteConfig(logits_scaling=4.0, **common)
    else:
        cfg = transformers.CohereConfig(logit_scale=0.25, **common)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    m.config._attn_implementation = "eager"
    head = torch.nn.Linear(32, 96, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.get_output_embeddings().weight)
        head.bias.normal_(0, 1.0)  # large enough that an unscaled bias changes p(gold)
    m.set_output_embeddings(head)
    return m


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_lm_head_spec_reproduces_the_models_logits(arch):
    from xtf_kernels.lm_head import lm_head_spec

    m = _scaled_biased_lm(arch)
    spec = lm_head_spec(m)
    assert spec.bias is not None and spec.logit_scale != 1.0 and spec.softcap is None
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = m.get_decoder()(input_ids=ids).last_hidden_state
        h, w, b = spec.operands(hidden)
        torch.testing.assert_close(h @ w.T + b, m(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_knowledge_novelty_with_logit_scale_and_head_bias(arch):
    """Regression (issue 11): the scorer scaled the hidden states but not the LM-head bias."""
    from xtf_kernels.xtf.scorers import knowledge_novelty

    m = _scaled_biased_lm(arch)
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits.double(), -1)
    gold = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    got = knowledge_novelty(m, ids, mask, backend="torch")
    want_kn = 1.0 - gold.exp()
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(got["kn"][:, 1:][valid].double(), want_kn[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["logprob"][:, 1:][valid].double(), gold[valid], atol=1e-5, rtol=1e-4)
    assert torch.isnan(got["kn"][:, 0]).all() and torch.isnan(got["kn"][1, 7:]).all()


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_apply_xtf_loss_with_logit_scale_and_head_bias(arch):
    from xtf_kernels.integrations import apply_xtf

    m = _scaled_biased_lm(arch)
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(input_ids=ids, labels=ids).loss
        apply_xtf(m, backend="torch")
        got = m(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lm_head_spec_errors():
    from xtf_kernels.lm_head import lm_head_spec

    with pytest.raises(TypeError, match="get_output_embeddings"):
        lm_head_spec(torch.nn.Linear(2, 2))

    class NoHead(torch.nn.Module):
        config = object()

        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="no LM head"):
        lm_head_spec(NoHead())


def test_reason_names_are_defined_once():
    import numpy as np

    from xtf_kernels.xtf.rules import (
        N_REASON_MASKS,
        REASON_COMBINATIONS,
        REASONS,
        overlap_counts,
        reason_label,
        reason_names,
    )

    assert [r.name for r in REASONS] == ["RI", "KN", "TR"] and N_REASON_MASKS == 8
    assert REASON_COMBINATIONS == (1, 2, 4, 3, 5, 6, 7)
    assert reason_names(5) == ["RI", "TR"] and reason_label(5) == "RI+TR" and reason_label(0) == "none"
    assert reason_label(7, sep="&") == "RI&KN&TR" and reason_label(0, none="kept") == "kept"
    reasons = np.array([0, 1, 3, 7, 4, 6, 2], dtype=np.uint8)
    oc = overlap_counts(reasons, np.ones(reasons.size, dtype=bool))
    assert [k for k in oc if not k.startswith("only:")][:7] == ["RI", "KN", "TR", "RI&KN", "RI&TR", "KN&TR", "RI&KN&TR"]
    assert (oc["RI"], oc["KN"], oc["TR"], oc["RI&KN"], oc["KN&TR"], oc["RI&KN&TR"]) == (3, 4, 3, 2, 2, 1)
    assert (oc["kept"], oc["masked"], oc["response"]) == (1, 6, 7)


def test_summary_and_report_use_the_rules_names():
    import numpy as np

    from xtf_kernels.xtf import report
    from xtf_kernels.xtf.data import TokenizeStats
    from xtf_kernels.xtf.rules import RuleConfig
    from xtf_kernels.xtf.summary import build_summary, count_types

    keys = [f"only:{b}" for b in range(8)]
    tot = np.array([5, 1, 2, 1, 0, 1, 0, 1, 20, 9, 2])  # only:0..7, total, prompt, examples
    s = build_summary(tot, keys, TokenizeStats(), 2, RuleConfig(), None, None, {}, "fp", 1, {})
    assert s["masked"] == {"RI": 4, "KN": 4, "TR": 2, "any": 6}
    assert list(s["overlap"]["pairs"]) == ["RI&KN", "RI&TR", "KN&TR"]
    assert list(s["overlap"]["combinations"]) == ["none", "RI", "KN", "RI+KN", "TR", "RI+TR", "KN+TR", "RI+KN+TR"]
    assert report._NAMES[0] == "kept" and report._NAMES[6] == "KN+TR"
    acc = np.zeros((5, 4), dtype=np.int64)
    count_types(acc, np.array([0, 1, 1, 3]), np.array([0, 1, 6, 4]))
    assert acc.tolist() == [[1, 2, 0, 1], [0, 2, 0, 1], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 1]]
