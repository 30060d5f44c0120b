"""``xtf demo``: generator determinism, exact noise positions, the --smoke run end to end."""

from __future__ import annotations

import html as html_mod
import json
import re

import numpy as np
import pytest

from xtf_kernels.demo.data import (
    BOILERPLATE_PHRASES,
    CHAT_SLOTS,
    CHAT_TEMPLATES,
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


def _chat_regex(t: str) -> str:
    parts = re.split(r"{(\w+)}", t)  # literal, slot, literal, slot, ...
    return "^" + "".join(re.escape(p) if k % 2 == 0 else "(" + "|".join(map(re.escape, CHAT_SLOTS[p])) + ")"
                         for k, p in enumerate(parts)) + "$"


_CHAT = re.compile("|".join(_chat_regex(t) for t in CHAT_TEMPLATES))


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
                assert text[0] == " " and _CHAT.match(text[1:]) and s.original == ""
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


def test_pretraining_has_both_domains_and_the_vocabulary_is_large():
    from xtf_kernels.demo.data import chat_words
    from xtf_kernels.demo.tokenizer import train_tokenizer

    d = make_demo_data(2, n_pretrain=2000, n_finetune=100, n_reference=5, n_test=5, chat_fraction=0.3)
    chat = [t for t in d.pretrain_texts if not t.startswith("Question:")]
    assert len(chat) == 600 and all(_CHAT.match(x) for t in chat for x in re.split(r"(?<=\.) ", t))
    # every filler word of the fine-tuning split occurs in the pretraining text (trained embeddings)
    pre_words = set(re.findall(r"[a-z]+", " ".join(d.pretrain_texts).lower()))
    filler = [e.response[s.start : s.end] for e in d.finetune for s in e.noise if s.kind == "filler"]
    assert filler and set(re.findall(r"[a-z]+", " ".join(filler).lower())) <= pre_words
    assert {"sofa", "museum", "pirates"} <= chat_words() and not {"answer", "apples", "buys"} & chat_words()
    assert len(d.validation) == 5 and d.validation[0].to_dict() != d.test[0].to_dict()
    tok = train_tokenizer(d.pretrain_texts + [e.prompt + e.response for e in d.finetune], 1024)
    assert len(tok) == 1024
    assert [tok.convert_ids_to_tokens(i) for i in tok(" 1234", add_special_tokens=False)["input_ids"]][-4:] == list("1234")


def test_demo_smoke_end_to_end(tmp_path, capsys):
    from xtf_kernels.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--out", str(out), "--no-progress", "--ablation", "--readings"]) == 0
    printed = capsys.readouterr()
    assert f"report: {out}/report.html" in printed.out
    assert "[seed 0] pretrained the base" in printed.err  # progress lines go with the bars, to stderr
    res = json.loads((out / "results.json").read_text())
    # the interpretation paragraph leads the terminal output and the report
    assert printed.out.lstrip().startswith(res["interpretation"][:40]) and "exact match" in res["interpretation"]
    main_arms = {"base", "normal", "xtf", "random", "slm", "token_cleaning"}
    readings = {"xtf_paper", "xtf_ri_received", "xtf_input_tr"}
    ablation = {"xtf_ri", "xtf_kn", "xtf_tr", "xtf_ri+kn", "xtf_ri+tr", "xtf_kn+tr"}
    assert set(res["methods"]) == main_arms | readings | ablation
    for k, m in res["methods"].items():
        assert set(m["exact_match"]) == set(m["std"]) == set(m["per_seed"]) == {"all", "seen", "new"}
        assert all(0.0 <= v <= 1.0 for v in m["exact_match"].values())
        assert {"kept_fraction", "kept_noise_share", "filler_share", "answer_phrase_share", "retention"} <= set(m)
        if k != "base":
            assert 0.0 <= m["kept_fraction"] <= 1.0 and 0.0 <= m["kept_noise_share"] <= 1.0
    assert res["methods"]["normal"]["kept_noise_share"] == pytest.approx(res["full_noise_share"])
    # noise of the kept set by kind (corrupted results apart), and the flag against the full data
    full = res["full_noise_by_kind"]
    assert full["all"] == pytest.approx(res["full_noise_share"])
    assert full["all"] == pytest.approx(full["filler"] + full["boilerplate"] + full["corrupt"])
    assert full["targeted"] == pytest.approx(full["filler"] + full["boilerplate"])
    for k, m in res["methods"].items():
        if k == "base":
            assert m["kept_noise_by_kind"] is None and m["noise_rises"] is None
            continue
        assert m["kept_noise_by_kind"]["all"] == pytest.approx(m["kept_noise_share"])
        assert m["noise_rises"] == (m["kept_noise_share"] > 1.1 * res["full_noise_share"])
        want = "HIGHER" if m["noise_rises"] else "lower" if 1.1 * m["kept_noise_share"] < res["full_noise_share"] \
            else "similar"
        assert m["noise_vs_full"] == want
    assert res["methods"]["normal"]["noise_rises"] is False and res["methods"]["normal"]["noise_vs_full"] == "similar"
    det = res["detection"]
    assert {"RI", "KN", "TR", "XTF (union)", "random (matched)"} <= set(det)
    assert all(0.0 <= v <= 1.0 for d in det.values() for v in d.values())
    assert sum(res["noise_tokens"][k] for k in NOISE_KINDS) > 0
    # the union's kept ratio is what the random baseline used
    assert res["methods"]["random"]["kept_fraction"] == pytest.approx(res["methods"]["xtf"]["kept_fraction"], abs=0.01)
    diag = res["per_seed"][0]["diagnostics"]
    assert {"always_masked", "per_type"} <= set(diag)
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "Token Cleaning" in html
    assert "What the numbers show" in html and "vs full data" in html
    # sample generations of the first seed, per arm
    first = res["per_seed"][0]["methods"]["normal"]["samples"][0]
    assert "<h4>Normal FT</h4>" in html and html_mod.escape(first) in html
    for png in ("loss_curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| Normal FT |" in table and "| XTF (official preset: released rules) |" in table
    assert "+/-" not in table  # one seed: no spread
    assert res["per_seed"][0]["preset"] == "official" and res["per_seed"][0]["tr_cut"] is not None
    scored = json.loads((out / "seed-0" / "xtf_scores" / "summary.json").read_text())
    assert scored["thresholds"]["tr"]["domain_words"] == [*map(str, range(1, 11)), "+", "-", "*", "/", "=", "maths"]
    for key, preset in (("xtf_scores_paper", "paper"), ("xtf_scores_ri_received", "official")):
        assert json.loads((out / "seed-0" / key / "summary.json").read_text())["preset"] == preset
    losses = json.loads((out / "seed-0" / "losses.json").read_text())
    assert len(losses["xtf"]) == res["config"]["finetune_steps"]
    assert all(np.isfinite(losses["xtf"]))
    assert len(read_jsonl(out / "seed-0" / "data" / "finetune.jsonl")) == res["config"]["n_finetune"]
    # seeds run as separate processes are aggregated by --collect into the same files
    coll = tmp_path / "collected"
    assert main(["demo", "--collect", str(out), "--out", str(coll), "--quiet"]) == 0
    res2 = json.loads((coll / "results.json").read_text())
    assert res2["methods"] == res["methods"] and res2["seeds"] == [0]
    assert (coll / "report.html").is_file()


def test_demo_cli_rejects_bad_input_and_deprecates_builtin(capsys):
    from xtf_kernels.demo.cli import main

    assert main(["--smoke", "--seeds", "-1"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["--smoke", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    with pytest.warns(DeprecationWarning, match="builtin"):
        assert main(["--smoke", "--scorer", "builtin", "--seeds", "-1"]) == 2


def test_demo_scores_are_the_frameworks_and_ri_matches_the_eager_oracle(tmp_path):
    """The demo has no scorer of its own: its table is score_dataset's shards, aligned with the
    demo's noise labels; RI agrees with eager attention (the oracle lives in tests/_tiny.py)."""
    import pyarrow.parquet as pq
    import torch

    from tests._tiny import eager_received_attention
    from xtf_kernels.demo.scoring import score_examples
    from xtf_kernels.demo.tokenizer import encode_example, train_tokenizer
    from xtf_kernels.demo.train import ModelSize, make_model

    d = make_demo_data(1, n_pretrain=50, n_finetune=16, n_reference=2, n_test=2)
    tok = train_tokenizer(d.pretrain_texts + [e.prompt + e.response for e in d.finetune], 400)
    model = make_model(len(tok), ModelSize(hidden=32, intermediate=64), 0).eval()
    from xtf_kernels.xtf import RuleConfig

    t = score_examples(model, tok, d.finetune, tmp_path / "fw", rules=RuleConfig(preset="paper"))  # RI received
    shard = pq.read_table(tmp_path / "fw" / "tokens" / "shard-00000.parquet")
    np.testing.assert_array_equal(t["kn"], shard["kn"].to_numpy())
    np.testing.assert_array_equal(t["reasons"], shard["reasons"].to_numpy())
    ids = [encode_example(tok, e)[0] for e in d.finetune[:4]]
    L = max(map(len, ids))
    x = torch.zeros(4, L, dtype=torch.long)
    m = torch.zeros(4, L, dtype=torch.long)
    for i, s in enumerate(ids):
        x[i, : len(s)], m[i, : len(s)] = torch.tensor(s), 1
    want = eager_received_attention(model, x, m).numpy()
    for i, s in enumerate(ids):
        np.testing.assert_allclose(t["ri"][t["example_id"] == i], want[i, : len(s)], atol=1e-5, rtol=1e-4)


def test_metrics_known_answers():
    from xtf_kernels.demo.data import MathExample
    from xtf_kernels.demo.metrics import generation_metrics, kept_noise_share, kn_masked_types

    ex = [MathExample("p", "r", "r", 5, 0), MathExample("p", "r", "r", 7, 3), MathExample("p", "r", "r", 2, 1)]
    g = generation_metrics([" The answer is 5.", " my cat likes the sofa. The answer is 8.", " 2"], ex)
    assert g["exact_match"] == {"all": pytest.approx(1 / 3), "seen": 0.5, "new": 0.0}
    assert g["filler_share"] == pytest.approx(1 / 3) and g["answer_phrase_share"] == pytest.approx(2 / 3)
    assert kept_noise_share(np.array([1, 1, 0, 1], bool), np.array([0, 2, 1, 1])) == pytest.approx(2 / 3)
    from xtf_kernels.demo.data import noise_shares

    sh = noise_shares(np.array([1, 1, 0, 1, 1, 1], bool), np.array([0, 2, 1, 1, 3, 0]))
    assert sh == pytest.approx({"all": 0.6, "filler": 0.2, "boilerplate": 0.2, "corrupt": 0.2, "targeted": 0.4})
    assert noise_shares(np.zeros(3, bool), np.ones(3, int))["all"] == 0.0  # nothing kept: no division by zero
    with pytest.raises(ValueError, match="keep, noise"):
        noise_shares(np.ones(2, bool), np.ones(3, int))
    t = {"is_response": np.ones(45, bool), "token_id": np.array([4] * 25 + [5] * 20),
         "reasons": np.array([2] * 13 + [0] * 12 + [6] * 20)}
    assert kn_masked_types(t) == [4, 5] and kn_masked_types(t, share=0.9) == [5]


def test_demo_lora_regime_on_validation_split(tmp_path, capsys):
    """--regime lora trains LoRA adapters through peft (the reference model merged for SLM / Token
    Cleaning); --eval-split validation with a reported seed warns."""
    from xtf_kernels.cli import main

    out = tmp_path / "lora"
    assert main(["demo", "--smoke", "--regime", "lora", "--eval-split", "validation", "--seeds", "0",
                 "--no-progress", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "are the reported seeds" in err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["regime"] == "lora" and res["eval_split"] == "validation"
    assert {"normal", "xtf", "slm", "token_cleaning"} <= set(res["methods"])
    assert all(0.0 <= m["exact_match"]["all"] <= 1.0 for m in res["methods"].values())


def test_aggregate_noise_by_kind_needs_every_seed():
    """Seeds of an older run (no kept_noise_by_kind) collected with new ones: no partial means."""
    from xtf_kernels.demo.aggregate import _method

    em = {"all": 0.5, "seen": 0.5, "new": 0.5}
    new = {"exact_match": em, "kept_noise_share": 0.1, "kept_noise_by_kind": {"all": 0.1, "targeted": 0.08}}
    old = {"exact_match": em, "kept_noise_share": 0.3}
    assert _method([new, new], "xtf")["kept_noise_by_kind"] == pytest.approx({"all": 0.1, "targeted": 0.08})
    mixed = _method([new, old], "xtf")
    assert mixed["kept_noise_by_kind"] is None and mixed["kept_noise_share"] == pytest.approx(0.2)


def test_selection_grid_and_reported_seeds_refused(tmp_path, capsys):
    from xtf_kernels.demo.selection import GRID, VALIDATION_SEEDS, main, sweep

    assert not set(VALIDATION_SEEDS) & {0, 1, 2}
    names = [n for n, _ in GRID]
    assert len(names) == len(set(names)) == 8 and "pre1200-full-lr0.001" in names
    with pytest.raises(SystemExit):
        main(["--out", "/tmp/never", "--seeds", "1", "100"])
    assert "reported seeds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reported seeds"):  # the function refuses them too
        sweep(tmp_path / "never", seeds=(2,))
    assert not (tmp_path / "never").exists()


def test_one_seed_has_no_spread_and_no_error_bars(tmp_path, monkeypatch):
    """Issue 17 item 13: one seed prints no '+/- 0.0' and draws no zero-height error bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from xtf_kernels.demo.report import _plots, comparison_table

    def method(em):
        g = {"all": em, "seen": em, "new": em}
        return {"label": "m", "exact_match": g, "std": {k: 0.0 for k in g}, "kept_fraction": 1.0}

    res = {"methods": {"normal": method(0.4), "xtf": method(0.3)}, "seeds": [0]}
    assert "+/-" not in comparison_table(res)
    assert "+/- 1.0" in comparison_table({**res, "seeds": [0, 1], "methods": {
        "normal": {**method(0.4), "std": {"all": 0.01, "seen": 0.0, "new": 0.0}}}})
    seen = []
    orig = Axes.bar

    def spy(self, *a, **k):
        seen.append(k.get("yerr"))
        return orig(self, *a, **k)

    monkeypatch.setattr(Axes, "bar", spy)
    _plots(res, [{"pretrain": [1.0, 0.5], "normal": [1.0], "xtf": [1.0]}], tmp_path)
    assert seen == [None]
    seen.clear()
    _plots({**res, "seeds": [0, 1]}, [{"pretrain": [1.0], "normal": [1.0], "xtf": [1.0]}] * 2, tmp_path)
    assert seen and seen[0] is not None
