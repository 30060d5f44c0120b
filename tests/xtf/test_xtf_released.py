"""The official preset's rules (the released implementation's capped rules) on known answers."""

from __future__ import annotations

import numpy as np
import pytest

from xtf_kernels.xtf import Reason, RuleConfig, apply_rules
from xtf_kernels.xtf.released import (
    capped_kn_mask,
    capped_ri_mask,
    capped_tr_mask,
    cumulative_pick,
    official_tr_cut,
)
from xtf_kernels.xtf.rules import parse_rules


def test_presets_resolve_their_defaults_and_refuse_mixtures():
    off = RuleConfig()
    assert (off.preset, off.ri_k, off.tr_classes, off.tr_source, off.ri_source) == (
        "official",
        1.5,
        5,
        "isolated",
        "released",
    )
    assert off.percentages == (0.05, 0.10, 0.05)
    pap = RuleConfig(preset="paper")
    assert (pap.ri_k, pap.tr_classes, pap.tr_source, pap.ri_source, pap.percentages) == (
        1.0,
        3,
        "input",
        "received",
        None,
    )
    assert RuleConfig(percentages=(0.1, 0.2, 0.3)).to_dict()["percentages"] == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="preset"):
        RuleConfig(preset="nope")
    with pytest.raises(ValueError, match="percentages"):
        RuleConfig(preset="paper", percentages=(0.05, 0.1, 0.05))
    with pytest.raises(ValueError, match="percentages"):
        RuleConfig(percentages=(0.05, 1.5, 0.05))
    with pytest.raises(ValueError, match="ri_source"):
        RuleConfig(preset="paper", ri_source="released")
    with pytest.raises(ValueError, match="contextual"):
        RuleConfig(tr_source="contextual")


def test_parse_rules_accepts_any_case():
    assert parse_rules("KN,tr") == ("kn", "tr")
    assert parse_rules(" Ri , KN ") == ("ri", "kn")
    with pytest.raises(ValueError, match="RI, KN, TR"):
        parse_rules("kn,xx")
    with pytest.raises(ValueError):
        parse_rules("")


def test_kn_cap_keeps_the_most_confident_tenth():
    # 20 response tokens, all above 0.95: the cap keeps only p > sorted_p[int(20 * 0.9)] = sorted_p[18]
    p = np.linspace(0.96, 0.999, 20)
    ex = np.zeros(20, dtype=np.int64)
    resp = np.ones(20, dtype=bool)
    fired = capped_kn_mask(p, ex, resp, 0.95, 0.10)
    assert fired.tolist() == [False] * 19 + [True]
    # below the absolute cut nothing fires, whatever the cap
    assert not capped_kn_mask(p - 0.5, ex, resp, 0.95, 1.0).any()
    # n = 5: int(5 * 0.9) = 4 -> p > max never fires
    assert not capped_kn_mask(np.full(5, 0.99), np.zeros(5), np.ones(5, bool)).any()


def test_tr_cap_needs_twenty_tokens():
    rel = np.arange(19, dtype=np.float64)
    assert not capped_tr_mask(
        rel, np.zeros(19), np.ones(19, bool), cut=100.0
    ).any()  # index 0 is the minimum
    rel = np.arange(
        40, dtype=np.float64
    )  # int(40 * 0.05) = 2: values 0 and 1 fire when below the cut
    fired = capped_tr_mask(rel, np.zeros(40), np.ones(40, bool), cut=1.5)
    assert np.flatnonzero(fired).tolist() == [0, 1]
    fired = capped_tr_mask(rel, np.zeros(40), np.ones(40, bool), cut=0.5)
    assert np.flatnonzero(fired).tolist() == [0]
    assert not capped_tr_mask(rel, np.zeros(40), np.ones(40, bool), cut=None).any()


def test_ri_fence_and_its_cap():
    # 20 values, 1.5 IQR fence: only the outlier at -100 is below it (1/20 = 5 %, not more than the cap)
    x = np.concatenate([[-100.0], np.arange(1, 20, dtype=np.float64)])
    fired, fences = capped_ri_mask(x, np.zeros(20), np.ones(20, bool), 1.5, 0.05)
    q1, q3 = np.percentile(x, [25, 75])
    assert fences[0] == pytest.approx(q1 - 1.5 * (q3 - q1))
    assert np.flatnonzero(fired).tolist() == [0]
    # three outliers (15 % > 5 %): the fence becomes sorted[int(20 * 0.05)] = sorted[1], strictly below
    y = np.concatenate([[-300.0, -200.0, -100.0], np.arange(1, 18, dtype=np.float64)])
    fired, fences = capped_ri_mask(y, np.zeros(20), np.ones(20, bool), 1.5, 0.05)
    assert fences[0] == -200.0
    assert np.flatnonzero(fired).tolist() == [0]


def test_cumulative_pick_walks_the_proportions():
    t = np.array([0.1, 0.2, 0.3, 0.4])
    assert cumulative_pick(t, [0.9, 0.5, 0.2, 0.1]) == 0.1  # exceeds 1.0 at i = 1 -> t[0]
    assert cumulative_pick(t, [1.0, 0.05, 0.0, 0.0]) == 0.1
    assert cumulative_pick(t, [0.6, 0.3, 0.2, 0.1]) == 0.2  # 0.6, 0.9, 1.1 at i = 2 -> t[1]
    assert cumulative_pick(t, [0.4, 0.3, 0.2, 0.05]) == 0.4  # never exceeds
    assert cumulative_pick([0.5], [1.0]) == 0.5


def test_official_cut_matches_scikit_image():
    skf = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.normal(0.1, 0.05, 50), rng.normal(0.5, 0.05, 80), rng.normal(0.8, 0.02, 30)]
    )
    values = values.astype(np.float32).astype(np.float64)
    counts = rng.integers(1, 20, values.size)
    occ = np.repeat(values, counts)
    ref = skf.threshold_multiotsu(occ, classes=5)
    got = official_tr_cut(values, counts, classes=5, nbins=256)
    np.testing.assert_allclose(got["thresholds"], ref, rtol=0, atol=1e-12)
    props = [np.mean(occ >= t) for t in ref]
    np.testing.assert_allclose(got["proportions"], props, atol=1e-12)
    assert got["cut"] == cumulative_pick(ref, props)
    assert got["range"] == [occ.min(), occ.max()]
    with pytest.raises(ValueError, match="same relevance"):
        official_tr_cut(np.ones(3), np.ones(3, dtype=np.int64))


def test_apply_rules_official_union_and_released_ri_flags_nothing():
    n = 40
    ex = np.zeros(n + 2, dtype=np.int64)
    resp = np.array([False, False] + [True] * n)
    kn = np.concatenate([[0.5, 0.5], np.full(n, 0.5)])
    kn[2 + 7] = (
        0.001  # p = 0.999: the most confident one -> KN (int(40 * 0.9) = 36: p > sorted[36] = 0.5)
    )
    tr = np.concatenate([[np.nan, np.nan], np.linspace(0.0, 1.0, n)])
    ri = np.concatenate([[0.0, 0.0], np.ones(n)])
    ri[2 + 20] = -50.0
    table = {
        "example_id": ex,
        "is_response": resp,
        "ri": ri,
        "kn": kn,
        "tr": tr,
        "token_id": np.arange(n + 2),
    }
    reasons, keep = apply_rules(table, RuleConfig(), tr_cut=0.5)
    assert reasons[2 + 7] == Reason.KN
    assert (
        reasons[2 + 0] == Reason.TR and reasons[2 + 1] == Reason.TR
    )  # bottom 2 (int(40 * 0.05) = 2)
    assert reasons[2 + 20] == 0  # released RI: constant, flags nothing
    assert int((reasons > 0).sum()) == 3 and not keep[:2].any() and keep.sum() == n - 3
    reasons, _ = apply_rules(table, RuleConfig(ri_source="received"), tr_cut=0.5)
    assert reasons[2 + 20] == Reason.RI
    reasons, _ = apply_rules(table, RuleConfig(enabled=("kn",), protect=(9,)), tr_cut=0.5)
    assert not reasons.any()  # token id 9 is row 9 = response token 7: protected
    reasons, _ = apply_rules(table, RuleConfig(), tr_cut=None)
    assert int((reasons > 0).sum()) == 1
