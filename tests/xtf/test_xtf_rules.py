"""XTF rules on hand-made score tables with known answers, and the baseline selection policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xtf_kernels import TokenStats, masked_ce
from xtf_kernels.xtf import (
    EntropyPolicy,
    RandomPolicy,
    Reason,
    RuleConfig,
    SLMPolicy,
    TokenCleaningPolicy,
    apply_rules,
    keep_top_fraction,
    kn_mask,
    make_policy,
    matched_ratio,
    overlap_counts,
    reason_names,
    ri_fence_mask,
    tr_mask,
)


def _table():
    # example 0: 2 prompt tokens, 8 response tokens; example 1: 1 prompt, 4 response
    ex = np.array([0] * 10 + [1] * 5)
    resp = np.array([False, False] + [True] * 8 + [False] + [True] * 4)
    # ex0 response RI: 1..8 except one outlier 0.0 -> Q1, Q3 over [0,2,3,4,5,6,7,8]
    ri = np.array([0.0, 0.0, 0.0, 2, 3, 4, 5, 6, 7, 8, 9.0, 1.0, 1.0, 1.0, 1.0])
    kn = np.array([0.01, 0.01, 0.5, 0.01, 0.5, 0.04, 0.05, 0.5, np.nan, 0.5, 0.0, 0.5, 0.5, 0.5, 0.01])
    tr = np.array([np.nan, np.nan, 0.1, 0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.1, np.nan, 0.5, 0.1, 0.9, 0.5])
    return {"example_id": ex, "is_response": resp, "ri": ri, "kn": kn, "tr": tr}


def test_ri_fence_known_answer():
    t = _table()
    fired, fences = ri_fence_mask(t["ri"], t["example_id"], t["is_response"], k=1.0)
    q1, q3 = np.percentile([0, 2, 3, 4, 5, 6, 7, 8], [25, 75])  # 2.75, 6.25
    assert fences[0] == pytest.approx(q1 - (q3 - q1))  # -0.75: nothing below
    assert not fired.any()
    # k = 0.1 -> fence 2.4: the 0.0 (pos 2) and 2 (pos 3) fire; ex1 constant -> fence 1.0, nothing fires
    fired, fences = ri_fence_mask(t["ri"], t["example_id"], t["is_response"], k=0.1)
    assert np.flatnonzero(fired).tolist() == [2, 3]
    assert fences[1] == pytest.approx(1.0)
    # prompt tokens never enter: the 9.0 prompt token of ex1 is ignored
    assert not fired[10]


def test_kn_and_tr_known_answers():
    t = _table()
    assert np.flatnonzero(kn_mask(t["kn"], t["is_response"], 0.05)).tolist() == [3, 5, 14]  # 0.05 is not < 0.05; NaN never
    th = np.array([0.3, 0.7])  # classes: <0.3, [0.3, 0.7), >=0.7 ; class 1 masked
    assert np.flatnonzero(tr_mask(t["tr"], t["is_response"], th, 1)).tolist() == [3, 5, 8, 11, 14]
    assert np.flatnonzero(tr_mask(t["tr"], t["is_response"], th, 0)).tolist() == [2, 6, 9, 12]
    assert not tr_mask(t["tr"], t["is_response"], None).any()


def test_apply_rules_union_reasons_and_prompt():
    t = _table()
    reasons, keep = apply_rules(t, RuleConfig(preset="paper", ri_k=0.1), np.array([0.3, 0.7]))
    want = np.zeros(15, dtype=np.uint8)
    want[[2, 3]] |= np.uint8(Reason.RI)
    want[[3, 5, 14]] |= np.uint8(Reason.KN)
    want[[3, 5, 8, 11, 14]] |= np.uint8(Reason.TR)
    np.testing.assert_array_equal(reasons, want)
    assert reasons[3] == 7 and reason_names(int(reasons[3])) == ["RI", "KN", "TR"]
    assert reason_names(int(reasons[5])) == ["KN", "TR"]
    np.testing.assert_array_equal(keep, t["is_response"] & (want == 0))
    assert not keep[[0, 1, 10]].any()  # prompt tokens never trained
    oc = overlap_counts(reasons, t["is_response"])
    assert oc["response"] == 12 and oc["masked"] == 6 and oc["kept"] == 6
    assert (oc["RI"], oc["KN"], oc["TR"], oc["RI&KN"], oc["KN&TR"], oc["RI&KN&TR"]) == (2, 3, 5, 1, 3, 1)
    # ablation: only KN
    reasons, keep = apply_rules(t, RuleConfig(preset="paper", enabled=("kn",)), np.array([0.3, 0.7]))
    assert np.flatnonzero(reasons).tolist() == [3, 5, 14] and set(reasons[reasons > 0]) == {2}


def test_rule_config_validation():
    with pytest.raises(ValueError, match="ri_k"):
        RuleConfig(ri_k=-1)
    with pytest.raises(ValueError, match="kn_threshold"):
        RuleConfig(kn_threshold=2.0)
    with pytest.raises(ValueError, match="tr_masked_class"):
        RuleConfig(tr_classes=3, tr_masked_class=3)
    with pytest.raises(ValueError, match="enabled"):
        RuleConfig(enabled=("ri", "xx"))
    with pytest.raises(ValueError, match="missing column"):
        apply_rules({"ri": np.zeros(2)})
    with pytest.raises(ValueError, match="equal lengths"):
        kn_mask(np.zeros(3), np.zeros(2, bool))


def test_keep_top_fraction_and_policies_numpy():
    s = np.array([0.5, np.nan, 0.9, 0.1, 0.9, 0.3])
    v = np.array([True, True, True, True, True, False])
    assert np.flatnonzero(keep_top_fraction(s, v, 0.5)).tolist() == [2, 4]  # 4 eligible -> 2; tie by position
    assert not keep_top_fraction(s, v, 0.0).any()
    assert keep_top_fraction(s, v, 1.0).sum() == 4
    with pytest.raises(ValueError, match="ratio"):
        keep_top_fraction(s, v, 1.5)
    cols = {"logprob": np.log([0.9, 0.1, 0.5, 0.2]), "ref_logprob": np.log([0.5, 0.5, 0.5, 0.8]),
            "entropy": np.array([0.1, 2.0, 1.0, 0.5])}
    valid = np.ones(4, bool)
    # SLM: excess loss = ref_lp - lp: [-.59, 1.61, 0, 1.39] -> top half = 1, 3
    assert np.flatnonzero(SLMPolicy(0.5).keep_mask(cols, valid)).tolist() == [1, 3]
    # Token Cleaning: influence = loss_base - loss_ref = ref_lp - lp -> top half = 1, 3
    assert np.flatnonzero(TokenCleaningPolicy(0.5).keep_mask(cols, valid)).tolist() == [1, 3]
    assert np.flatnonzero(EntropyPolicy(0.25).keep_mask(cols, valid)).tolist() == [1]
    r1, r2 = RandomPolicy(0.5, seed=3).keep_mask(cols, valid), RandomPolicy(0.5, seed=3).keep_mask(cols, valid)
    assert r1.sum() == 2 and (r1 == r2).all()
    with pytest.raises(ValueError, match="needs column"):
        SLMPolicy(0.5).keep_mask({"logprob": cols["logprob"]}, valid)
    with pytest.raises(ValueError, match="name"):
        make_policy("nope", 0.5)
    assert matched_ratio({"tokens": {"response": 10, "kept": 6}}) == 0.6


def test_policies_as_masked_ce_select():
    torch.manual_seed(0)
    h, w = torch.randn(2, 6, 8), torch.randn(20, 8)
    y = torch.randint(0, 20, (2, 6))
    y[0, :2] = -100
    ref = torch.randn(2, 6).clamp(max=0) - 1
    _, st = masked_ce(h, w, y, ref_logprobs=ref, reduction="sum", return_stats=True)
    for pol, score in ((SLMPolicy(0.5), -st.logprob_delta), (TokenCleaningPolicy(0.5), -st.logprob_delta),
                       (EntropyPolicy(0.5), st.entropy)):
        loss, st2 = masked_ce(h, w, y, ref_logprobs=ref, reduction="sum", select=pol, return_stats=True)
        want = keep_top_fraction(score, st.keep, 0.5)
        assert torch.equal(st2.keep, want) and int(want.sum()) == 5
        tok_loss = -st.logprob[want]
        torch.testing.assert_close(loss.float(), tok_loss.sum().float(), rtol=1e-5, atol=1e-5)
    _, st3 = masked_ce(h, w, y, reduction="sum", select=RandomPolicy(0.3, seed=1), return_stats=True)
    assert int(st3.keep.sum()) == 3 and not st3.keep[0, :2].any()
    with pytest.raises(ValueError, match="logprob_delta"):
        SLMPolicy(0.5)(st3)
    with pytest.raises(TypeError, match="TokenStats"):
        EntropyPolicy(0.5)({"entropy": 1})
    assert isinstance(st3, TokenStats)
