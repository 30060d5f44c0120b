"""The readings as options: contextual TR, position-debiased RI, protected token ids, and the
ground-truth-free per-type diagnostics in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests._tiny import SAMPLE_TEXTS
from xtf_kernels.xtf import RuleConfig, apply_rules, score_dataset
from xtf_kernels.xtf.multiotsu import multiotsu_from_histogram
from xtf_kernels.xtf.rules import type_diagnostics
from xtf_kernels.xtf.scorers import reasoning_importance, uniform_received_mass


def _data(path: Path, n: int = 9) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q{i}: " + SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)][:12],
                                "response": SAMPLE_TEXTS[(i + 1) % len(SAMPLE_TEXTS)]}) + "\n")
    return path


def _table(d: Path) -> dict[str, np.ndarray]:
    t = pa.concat_tables([pq.read_table(f) for f in sorted((d / "tokens").glob("shard-*.parquet"))])
    return {c: t[c].to_numpy() for c in t.column_names}


def test_ruleconfig_readings_validate_and_serialise():
    c = RuleConfig(preset="paper", tr_source="contextual", ri_aggregation="debiased", protect=(5, 2, 5))
    assert c.protect == (2, 5) and c.to_dict()["protect"] == [2, 5] and c.to_dict()["tr_source"] == "contextual"
    paper = RuleConfig(preset="paper")
    assert paper.tr_source == "input" and paper.ri_aggregation == "mean" and paper.protect == ()
    for kw, name in (({"tr_source": "output"}, "tr_source"), ({"ri_aggregation": "sum"}, "ri_aggregation"),
                     ({"protect": (-1,)}, "protect"), ({"protect": "2"}, "protect"), ({"protect": (True,)}, "protect")):
        with pytest.raises(ValueError, match=name):
            RuleConfig(**{"preset": "paper", **kw})


def test_protect_never_masks_those_ids():
    t = {"example_id": np.zeros(5, int), "is_response": np.array([0, 1, 1, 1, 1], bool),
         "token_id": np.array([1, 7, 2, 7, 9]), "ri": np.ones(5), "kn": np.array([0.5, 0.0, 0.0, 0.0, 0.0]),
         "tr": np.full(5, 0.9)}
    reasons, keep = apply_rules(t, RuleConfig(preset="paper"), np.array([0.3, 0.7]))
    assert reasons.tolist() == [0, 2, 2, 2, 2] and keep.sum() == 0
    reasons, keep = apply_rules(t, RuleConfig(preset="paper", protect=(7,)), np.array([0.3, 0.7]))
    assert reasons.tolist() == [0, 0, 2, 0, 2] and keep.tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="token_id"):
        apply_rules({k: v for k, v in t.items() if k != "token_id"}, RuleConfig(preset="paper", protect=(7,)), None)


def test_uniform_received_mass_known_answers():
    u = uniform_received_mass(torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 0]]))
    np.testing.assert_allclose(u.numpy(), [[1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3], [0, 1.5, 0.5], [1.5, 0.5, 0]])
    # uniform attention of every real query has mass exactly this: sum over keys = number of queries
    assert u[0].sum().item() == pytest.approx(3.0)


def test_debiased_ri_equals_eager_mass_over_uniform(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(3, m.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    got = reasoning_importance(m, ids, mask, reduce="debiased")
    m.set_attn_implementation("eager")
    with torch.no_grad():
        att = m(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    q = mask.double()[:, None, :, None]  # padding queries excluded
    summed = torch.stack([(a.double() * q).sum(2).mean(1) for a in att]).mean(0)  # [B, L]: sum over queries
    want = torch.zeros(2, 9, dtype=torch.float64)
    for b in range(2):
        n = int(mask[b].sum())
        for j in range(n):
            want[b, j] = summed[b, j] / sum(1.0 / (i + 1) for i in range(j, n))
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=2e-5, atol=1e-6)


def test_contextual_tr_is_per_occurrence_and_matches_an_independent_computation(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "ctx"
    s = score_dataset(model_dir, data, out, shard_size=4, batch_size=3, progress=False, preset="paper",
                      tr_source="contextual")
    t = _table(out)
    resp = t["is_response"]
    # independent: final hidden states per example, V = mean over response tokens, cosine, min-max
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    hs, rs = [], []
    for e in sorted(set(t["example_id"].tolist())):
        ids = torch.from_numpy(t["token_id"][t["example_id"] == e].astype(np.int64))[None]
        with torch.no_grad():
            hs.append(m.model(input_ids=ids).last_hidden_state[0].double())
        rs.append(torch.from_numpy(resp[t["example_id"] == e]))
    H, R = torch.cat(hs), torch.cat(rs)
    V = H[R].mean(0)
    d = (1 - torch.nn.functional.cosine_similarity(H[R], V[None], dim=1)).numpy()
    want = 1 - (d - d.min()) / (d.max() - d.min())
    np.testing.assert_allclose(t["tr"][resp], want, atol=2e-6)
    # per occurrence: one token id can get several TR values
    ids_r, tr_r = t["token_id"][resp], t["tr"][resp]
    assert any(np.unique(tr_r[ids_r == i]).size > 1 for i in np.unique(ids_r))
    hist = np.histogram(tr_r.astype(np.float64), bins=256, range=(0, 1))[0]
    np.testing.assert_allclose(s["thresholds"]["tr"]["thresholds"],
                               multiotsu_from_histogram(hist, np.linspace(0, 1, 257), 3), atol=1e-6)
    assert s["thresholds"]["tr"]["domain"] == "response_hidden_states"
    assert s["settings"]["rules"]["tr_source"] == "contextual"
    del tok


def test_readings_enter_the_fingerprint_and_resume(model_dir, tmp_path):
    data = _data(tmp_path / "d.jsonl", n=6)
    out = tmp_path / "run"
    kw = dict(shard_size=2, batch_size=2, progress=False, preset="paper")
    fps = set()
    for opts in ({}, {"tr_source": "contextual"}, {"ri_aggregation": "debiased"}, {"protect": [2]}):
        fps.add(score_dataset(model_dir, data, out, overwrite=True, **kw, **opts)["fingerprint"])
        other = {"ri_aggregation": "debiased"} if opts != {"ri_aggregation": "debiased"} else {}
        with pytest.raises(FileExistsError):  # another reading of pass 1 in the same directory is refused
            score_dataset(model_dir, data, out, **kw, **other)
    assert len(fps) == 4
    # protect is a rule parameter: pass 1 is reused and the run says so
    s = score_dataset(model_dir, data, out, **kw, protect=[3])
    assert s["run"]["rules_changed"] == ["protect"] and s["run"]["reused_pass1"] == 3
    # a contextual run interrupted after pass 1 resumes to identical files
    ref = tmp_path / "ref"
    score_dataset(model_dir, data, ref, tr_source="contextual", **kw)
    again = tmp_path / "again"
    score_dataset(model_dir, data, again, tr_source="contextual", **kw)
    for sub in ("tokens", "ctx"):
        for f in (again / sub).glob("*.parquet"):
            f.unlink()
    score_dataset(model_dir, data, again, tr_source="contextual", **kw)
    for f in sorted(ref.rglob("*.parquet")):
        assert f.read_bytes() == (again / f.relative_to(ref)).read_bytes(), f
    with pytest.raises(ValueError, match="domain_words"):
        score_dataset(model_dir, data, tmp_path / "x", tr_source="contextual", domain_words=["a"], **kw)
    with pytest.raises(ValueError, match="ri_reduce"):
        score_dataset(model_dir, data, tmp_path / "y", ri_aggregation="debiased", ri_reduce="sum", **kw)


def test_type_diagnostics_known_answer_and_in_summary(model_dir, tmp_path):
    n = np.array([0, 30, 25, 10, 40])
    masked = np.array([0, 30, 12, 10, 39])
    per = {"RI": np.zeros(5, int), "KN": np.array([0, 30, 12, 10, 0]), "TR": np.array([0, 0, 0, 10, 39])}
    d = type_diagnostics(n, masked, per, lambda i: f"t{i}", min_count=20, share=0.95)
    assert d["always_masked"]["count"] == 2 and [r["token"] for r in d["always_masked"]["top"]] == ["t4", "t1"]
    assert d["always_masked"]["top"][0]["TR"] == pytest.approx(39 / 40)
    assert [r["token_id"] for r in d["per_type"]] == [4, 1, 2]  # type 3 has < 20 occurrences
    d1 = type_diagnostics(n, masked, per, top=1)  # top limits the always-masked list, not per_type
    assert len(d1["always_masked"]["top"]) == 1 and len(d1["per_type"]) == 3
    with pytest.raises(ValueError, match="counts"):
        type_diagnostics(n, masked[:3], per)
    s = score_dataset(model_dir, _data(tmp_path / "d.jsonl"), tmp_path / "o", progress=False, preset="paper")
    diag = s["diagnostics"]
    t = _table(tmp_path / "o")
    resp = t["is_response"]
    for row in diag["per_type"]:
        sel = resp & (t["token_id"] == row["token_id"])
        assert row["count"] == int(sel.sum())
        assert row["masked_share"] == pytest.approx(float((t["reasons"][sel] > 0).mean()))
        assert row["KN"] == pytest.approx(float(((t["reasons"][sel] & 2) > 0).mean()))
    saved = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert saved["diagnostics"]["always_masked"]["count"] == diag["always_masked"]["count"]
    frequent = np.bincount(t["token_id"][resp])
    assert len(diag["per_type"]) == int((frequent >= 20).sum())  # every frequent type, not a top list
    from xtf_kernels.xtf import build_report

    page = build_report(tmp_path / "o").read_text()
    assert "Diagnostics (no ground truth needed)" in page and "masked share per rule" in page


def test_xtf_score_cli_readings_flags(model_dir, tmp_path, capsys):
    from xtf_kernels.cli import main

    data, out = _data(tmp_path / "d.jsonl", n=5), tmp_path / "cli"
    assert main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet",
                 "--preset", "paper", "--tr-source", "contextual", "--ri-aggregation", "debiased",
                 "--protect", "2,3"]) == 0
    rules = json.loads((out / "summary.json").read_text())["settings"]["rules"]
    assert rules["tr_source"] == "contextual" and rules["ri_aggregation"] == "debiased" and rules["protect"] == [2, 3]
    assert (out / "ctx").is_dir()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--protect", "eos"])
    assert "--protect" in capsys.readouterr().err


def test_xtf_score_cli_warns_of_always_masked_types(model_dir, tmp_path, capsys):
    """With KN masking every score below 1, every frequent type is always masked: the CLI says so."""
    from xtf_kernels.cli import main

    data, out = _data(tmp_path / "d.jsonl", n=40), tmp_path / "cli"  # enough for >= 20 occurrences
    assert main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet",
                 "--kn-threshold", "1", "--preset", "paper"]) == 0
    printed = capsys.readouterr().out
    diag = json.loads((out / "summary.json").read_text())["diagnostics"]["always_masked"]
    assert diag["count"] > 0
    assert f"warning: {diag['count']} token types (>= 20 occurrences) are masked at >= 95% of their" in printed


@pytest.mark.parametrize("tr_source", ["input", "contextual"])
def test_tr_class_agrees_with_saved_column_and_thresholds(model_dir, tmp_path, tr_source):
    """The TR bit of every response token is its Multi-Otsu class from the saved (float32) column
    and the saved thresholds: histogram, rules and file see the same values."""
    from xtf_kernels.xtf.multiotsu import digitize

    cfg = RuleConfig(preset="paper", enabled=("tr",))  # TR alone
    s = score_dataset(model_dir, _data(tmp_path / "d.jsonl", n=12), tmp_path / "o", rules=cfg, progress=False,
                      tr_source=tr_source)
    thr = s["thresholds"]["tr"]["thresholds"]
    assert thr is not None
    t = _table(tmp_path / "o")
    resp = t["is_response"]
    assert t["tr"].dtype == np.float32
    want = resp & (digitize(t["tr"], np.asarray(thr)) == cfg.tr_masked_class)
    np.testing.assert_array_equal((t["reasons"] & 4) > 0, want)


def test_tr_value_just_below_a_bin_edge_is_classed_as_saved(model_dir, tmp_path, monkeypatch):
    """Three S_TR clusters, the middle one 1e-12 below the bin edge 0.5 (float32 rounds it onto the
    edge). The histogram must bin the value the rules see (the saved float32), else the middle
    cluster falls into the class above its threshold and is not masked."""
    from xtf_kernels.xtf.multiotsu import digitize
    from xtf_kernels.xtf.scorers import TaskRelevance

    original = TaskRelevance.finalize

    def clustered(self, *args, **kwargs):
        tr = original(self, *args, **kwargs)
        ids = np.arange(tr.size)
        values = np.choose(ids % 3, [0.2, 0.5 - 1e-12, 0.8])
        return np.where(np.isnan(tr), np.nan, values)

    monkeypatch.setattr(TaskRelevance, "finalize", clustered)
    s = score_dataset(model_dir, _data(tmp_path / "d.jsonl", n=12), tmp_path / "o", rules=RuleConfig(preset="paper", enabled=("tr",)),
                      progress=False)
    thr = np.asarray(s["thresholds"]["tr"]["thresholds"])
    t = _table(tmp_path / "o")
    resp = t["is_response"]
    cls = digitize(t["tr"], thr)
    middle = resp & (t["token_id"] % 3 == 1)
    assert middle.any() and (cls[middle] == 1).all(), (thr, np.unique(cls[middle]))
    np.testing.assert_array_equal((t["reasons"] & 4) > 0, resp & (cls == 1))
