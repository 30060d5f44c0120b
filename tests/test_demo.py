"""``xtf demo``: generator determinism, exact noise positions, the --smoke run end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from xtf_kernels.demo.data import (
    BOILERPLATE_PHRASES,
    FILLER_PHRASES,
    NOISE_KINDS,
    NoiseConfig,
    generate_split,
    make_demo_data,
    read_jsonl,
    write_jsonl,
)


def test_generator_is_deterministic_for_a_seed(tmp_path):
    a = generate_split(7, 50, noise=NoiseConfig())
    b = generate_split(7, 50, noise=NoiseConfig())
    c = generate_split(8, 50, noise=NoiseConfig())
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.to_dict() for e in a] != [e.to_dict() for e in c]
    d1 = make_demo_data(3, n_pretrain=20, n_finetune=20, n_reference=5, n_test=5)
    d2 = make_demo_data(3, n_pretrain=20, n_finetune=20, n_reference=5, n_test=5)
    assert d1.pretrain_texts == d2.pretrain_texts
    assert [e.to_dict() for e in d1.finetune] == [e.to_dict() for e in d2.finetune]
    # JSONL round trip keeps the recorded spans
    assert [e.to_dict() for e in read_jsonl(write_jsonl(a, tmp_path / "a.jsonl"))] == [e.to_dict() for e in a]


def _answer_ok(e) -> bool:
    return re.search(rf"The answer is {e.answer}\.$", e.clean_response) is not None


def test_recorded_noise_positions_are_exactly_where_noise_was_put():
    exs = generate_split(11, 400, noise=NoiseConfig(0.6, 0.6, 0.6))
    seen = {k: 0 for k in NOISE_KINDS}
    for e in exs:
        assert _answer_ok(e)
        spans = sorted(e.noise, key=lambda s: s.start)
        # spans are disjoint and inside the response
        for s, t in zip(spans, spans[1:]):
            assert s.end <= t.start
        rebuilt, pos = [], 0
        for s in spans:
            seen[s.kind] += 1
            text = e.response[s.start : s.end]
            if s.kind == "filler":
                assert text[0] == " " and text[1:] in FILLER_PHRASES and s.original == ""
            elif s.kind == "boilerplate":
                assert text[0] == " " and text[1:] in BOILERPLATE_PHRASES and s.original == ""
            else:
                assert text.isdigit() and s.original.isdigit() and text != s.original
                # the corrupted number is the result of an equation
                assert e.response[: s.start].endswith("= ")
            rebuilt.append(e.response[pos : s.start])
            rebuilt.append(s.original)
            pos = s.end
        rebuilt.append(e.response[pos:])
        # undoing exactly the recorded edits gives the clean response back, character for character
        assert "".join(rebuilt) == e.clean_response
        if not e.noise:
            assert e.response == e.clean_response
    assert all(v > 50 for v in seen.values()), seen


def test_noise_token_labels_match_spans():
    from xtf_kernels.demo.tokenizer import encode_example, noise_token_labels, train_tokenizer

    d = make_demo_data(5, n_pretrain=150, n_finetune=120, n_reference=5, n_test=5, noise=NoiseConfig(0.5, 0.5, 0.5))
    tok = train_tokenizer(d.pretrain_texts + [e.prompt + e.response for e in d.finetune], 400)
    for e in d.finetune:
        lab, partial = noise_token_labels(tok, e)
        ids, n_prompt, offsets = encode_example(tok, e)
        assert partial == 0
        assert len(lab) == len(ids) and not lab[:n_prompt].any() and lab[-1] == 0
        # decoded noisy tokens of each kind == the recorded span texts of that kind
        for k, kind in enumerate(NOISE_KINDS, start=1):
            got = tok.decode([t for t, lb in zip(ids, lab) if lb == k])
            want = "".join(e.response[s.start : s.end] for s in sorted(e.noise, key=lambda s: s.start) if s.kind == kind)
            assert got.strip() == want.strip().replace("  ", " ") or got.replace(" ", "") == want.replace(" ", "")
        # and the clean tokens are exactly the rest
        clean = np.array([lb == 0 for lb in lab[n_prompt:-1]])
        covered = np.zeros(len(e.response), bool)
        for s in e.noise:
            covered[s.start : s.end] = True
        for (a, b), c in zip(offsets[:-1], clean):
            if b > a:
                assert c == (not covered[a:b].any())


def test_noise_config_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="filler"):
        NoiseConfig(filler=1.5)
    with pytest.raises(ValueError, match="n"):
        generate_split(0, -1)


def test_demo_smoke_end_to_end(tmp_path, capsys):
    from xtf_kernels.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--out", str(out), "--no-progress", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}/report.html" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"base", "normal_ft", "xtf", "slm", "token_cleaning", "random"}
    for m in res["methods"].values():
        assert 0.0 <= m["mean"] <= 100.0
    det = res["detection"]
    assert {"RI", "KN", "TR", "XTF (union)", "random (matched)"} <= set(det)
    assert all(0.0 <= v <= 1.0 for d in det.values() for v in d.values())
    assert sum(res["noise_tokens"][k] for k in NOISE_KINDS) > 0
    # the union's kept ratio is what the random baseline used
    assert res["methods"]["random"]["kept_frac"] == pytest.approx(res["methods"]["xtf"]["kept_frac"], abs=0.01)
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "Token Cleaning" in html
    for png in ("loss_curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| Normal FT |" in table and "| XTF (RI+KN+TR) |" in table
    seed = json.loads((out / "seed-0" / "seed_result.json").read_text())
    assert len(seed["losses"]["xtf"]) == res["config"]["finetune_steps"]
    assert all(np.isfinite(seed["losses"]["xtf"]))
    assert len(read_jsonl(out / "seed-0" / "data" / "finetune.jsonl")) == res["config"]["n_finetune"]
    # seeds run as separate processes are aggregated by --collect into the same files
    coll = tmp_path / "collected"
    assert main(["demo", "--collect", str(out), "--out", str(coll), "--quiet"]) == 0
    res2 = json.loads((coll / "results.json").read_text())
    assert res2["methods"] == res["methods"] and res2["seeds"] == [0]
    assert (coll / "report.html").is_file()


def test_demo_cli_rejects_bad_input(capsys):
    from xtf_kernels.demo.cli import main

    assert main(["--smoke", "--seeds", "-1"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_builtin_scorer_matches_the_framework(tmp_path, monkeypatch):
    """The demo's in-memory XTF scorer (used when xtf_kernels.xtf is missing) gives the same scores
    and masks as the framework's score_dataset, and its eager-attention RI fallback agrees too."""
    import xtf_kernels.attention as att
    from xtf_kernels.demo.scoring import apply_rules, score_examples
    from xtf_kernels.demo.tokenizer import train_tokenizer
    from xtf_kernels.demo.train import ModelSize, make_model

    d = make_demo_data(1, n_pretrain=50, n_finetune=16, n_reference=2, n_test=2)
    tok = train_tokenizer(d.pretrain_texts + [e.prompt + e.response for e in d.finetune], 400)
    model = make_model(len(tok), ModelSize(hidden=32, intermediate=64), 0).eval()
    fw = score_examples(model, tok, d.finetune, tmp_path / "fw", scorer="framework")
    bi = score_examples(model, tok, d.finetune, tmp_path / "bi", scorer="builtin")
    assert fw["scorer"] == "framework" and bi["scorer"] == "builtin"
    r = fw["is_response"]
    assert np.array_equal(fw["token_id"], bi["token_id"]) and np.array_equal(fw["noise"], bi["noise"])
    for k in ("kn", "tr", "ri", "logprob"):
        np.testing.assert_allclose(fw[k][r], bi[k][r], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fw["tr_thresholds"], bi["tr_thresholds"])
    assert np.array_equal(apply_rules(fw), apply_rules(bi))

    def unavailable(*a, **k):
        raise RuntimeError("collector unavailable")

    monkeypatch.setattr(att, "collect_received_attention", unavailable)
    eager = score_examples(model, tok, d.finetune, tmp_path / "eager", scorer="builtin")
    np.testing.assert_allclose(eager["ri"][r], fw["ri"][r], atol=1e-5, rtol=1e-4)
