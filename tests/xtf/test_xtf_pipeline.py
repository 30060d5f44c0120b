"""End to end on a tiny random-init Llama: xtf score / export / report, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests._tiny import SAMPLE_TEXTS, eager_received_attention, make_tiny_model_dir
from xtf_kernels.cli import main
from xtf_kernels.xtf import (
    XTFDataError,
    build_report,
    export_dataset,
    load_token_table,
    score_dataset,
)
from xtf_kernels.xtf import shards as sh
from xtf_kernels.xtf.multiotsu import multiotsu_from_histogram


def write_data(path: Path, n: int = 11) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            t = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
            if i % 3 == 0:
                rec = {"messages": [{"role": "user", "content": t[:24]}, {"role": "assistant", "content": t}]}
            else:
                rec = {"prompt": f"Q{i}: " + t[:18], "response": t}
            f.write(json.dumps(rec) + "\n")
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and "report" not in p.parts}


def test_cli_score_export_report(model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    assert main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--shard-size", "4",
                 "--batch-size", "3", "--quiet", "--preset", "paper"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p.name for p in (out / "tokens").iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]
    t = load_token_table(out)
    cols = {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}
    resp = cols["is_response"]
    assert summary["tokens"]["total"] == len(resp) and summary["tokens"]["response"] == int(resp.sum())
    assert summary["examples"]["scored"] == 11
    # prompt tokens: never kept, no reasons, no TR; response tokens: kept iff no reason
    assert not cols["keep"][~resp].any() and (cols["reasons"][~resp] == 0).all()
    assert np.isnan(cols["tr"][~resp]).all() and not np.isnan(cols["tr"][resp]).any()
    np.testing.assert_array_equal(cols["keep"][resp], cols["reasons"][resp] == 0)
    assert summary["tokens"]["kept"] == int(cols["keep"].sum())
    for name, bit in (("RI", 1), ("KN", 2), ("TR", 4)):
        assert summary["masked"][name] == int(((cols["reasons"] & bit) > 0).sum())
    # TR is a function of the token id; min-max over the response tokens spans [0, 1]
    tr_r, ids_r = cols["tr"][resp], cols["token_id"][resp]
    assert tr_r.min() == 0.0 and tr_r.max() == pytest.approx(1.0)
    for tid in np.unique(ids_r)[:20]:
        assert np.unique(tr_r[ids_r == tid]).size == 1
    # thresholds are the Multi-Otsu of the count-weighted TR histogram; masked = middle class
    th = summary["thresholds"]["tr"]["thresholds"]
    hist = np.histogram(tr_r.astype(np.float64), bins=256, range=(0, 1))[0]
    np.testing.assert_allclose(th, multiotsu_from_histogram(hist, np.linspace(0, 1, 257), 3), atol=1e-6)
    tr_fired = (cols["reasons"] & 4) > 0
    np.testing.assert_array_equal(tr_fired[resp], (tr_r >= th[0]) & (tr_r < th[1]))
    # KN = 1 - p(gold) from the model's logits (the fused path materialised none)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    e0 = cols["example_id"] == 1
    ids = torch.tensor(cols["token_id"][e0], dtype=torch.long)[None]
    with torch.no_grad():
        lp = torch.log_softmax(m(ids).logits.float(), -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
    np.testing.assert_allclose(cols["kn"][e0][1:], 1 - lp.exp().numpy(), atol=1e-5)
    np.testing.assert_allclose(cols["ri"][e0], eager_received_attention(m, ids, torch.ones_like(ids))[0].numpy(), atol=1e-5)

    # export: labels -100 on masked and prompt tokens
    assert main(["export", str(out), "--to", str(tmp_path / "train.jsonl")]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    assert len(recs) == 11
    r = recs[1]
    sel = cols["example_id"] == r["example_id"]
    assert r["input_ids"] == cols["token_id"][sel].tolist()
    assert r["labels"] == np.where(cols["keep"][sel], cols["token_id"][sel], -100).tolist()
    assert r["response"] == cols["is_response"][sel].astype(bool).tolist()  # masked ones included
    assert sum(sum(q["response"]) for q in recs) == summary["tokens"]["response"]
    assert sum(sum(x != -100 for x in q["labels"]) for q in recs) == summary["tokens"]["kept"]
    info = export_dataset(out, tmp_path / "train.parquet", policy="random", seed=1)
    pt = pq.read_table(tmp_path / "train.parquet")
    assert pt.column_names == ["example_id", "input_ids", "labels", "keep", "response"]
    assert info["trained"] == summary["tokens"]["kept"]  # matched ratio by default
    with pytest.raises(ValueError, match="needs the reference model.s log-probs.*score with --ref-model"):
        export_dataset(out, tmp_path / "x.jsonl", policy="slm")

    # report
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert "<script>" in page and 'id="q"' in page and "data:image/png;base64," in page
    assert 'title="' in page and "KN=" in page and "src=\"http" not in page
    for png in ("hist_ri", "hist_kn", "hist_tr", "overlap"):
        assert (out / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert page.count('class="ex"') == 11


def test_resume_after_interrupt_gives_identical_files(model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", n=9)
    kw = dict(shard_size=3, batch_size=2, progress=False)
    ref = tmp_path / "ref"
    score_dataset(model_dir, data, ref, **kw)
    real = sh.write_table_atomic
    for stop_after in (2, 4):  # interrupted in pass 1, then in pass 2
        out = tmp_path / f"run{stop_after}"
        calls = {"n": 0}

        def flaky(*a, _stop=stop_after, _calls=calls, **k):
            if _calls["n"] == _stop:
                raise KeyboardInterrupt("simulated kill")
            _calls["n"] += 1
            return real(*a, **k)

        monkeypatch.setattr(sh, "write_table_atomic", flaky)
        with pytest.raises(KeyboardInterrupt):
            score_dataset(model_dir, data, out, **kw)
        monkeypatch.setattr(sh, "write_table_atomic", real)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
        assert len(before) == stop_after and not list(out.rglob("*.tmp")) and not (out / "summary.json").exists()
        score_dataset(model_dir, data, out, **kw)
        assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing rewritten
        assert _files(out) == _files(ref)


def test_bad_input_messages(model_dir, tmp_path):
    good = {"prompt": "p", "response": "r"}
    lines = [json.dumps(good), json.dumps({"prompt": "p"}), "{not json", json.dumps({"prompt": "p", "response": "  "}),
             json.dumps({"prompt": 3, "response": "x"}), json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps(good)]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(XTFDataError, match=r"line 2: missing field\(s\) \['response'\]"):
        score_dataset(model_dir, data, tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1" / "tokens").exists()
    s = score_dataset(model_dir, data, tmp_path / "o2", on_error="skip", progress=False)
    assert s["examples"]["skipped"] == {"bad_record": 5} and s["examples"]["scored"] == 2
    msgs = " ".join(s["examples"]["skip_messages"])
    for frag in ("line 3: invalid JSON", "line 4: empty response", "line 5: field 'prompt' must be a string",
                 "line 6: the last message must have role 'assistant'"):
        assert frag in msgs
    # CLI: one clear line, exit status 2
    assert main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o3"), "--quiet"]) == 2

    # too long: truncated with a count, or fail
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "Q: add", "response": " ".join(SAMPLE_TEXTS)}) + "\n" + json.dumps(good) + "\n")
    s = score_dataset(model_dir, long, tmp_path / "o4", max_length=40, progress=False)
    assert s["examples"]["truncated"] == 1 and load_token_table(tmp_path / "o4")["position"].to_numpy().max() == 39
    with pytest.raises(XTFDataError, match="line 1: .* exceed the model's context of 40"):
        score_dataset(model_dir, long, tmp_path / "o5", max_length=40, truncation="fail", progress=False)


def test_bad_model_dirs_and_existing_runs(model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=3)
    no_tok = make_tiny_model_dir(tmp_path, name="notok", save_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        score_dataset(no_tok, data, tmp_path / "a", progress=False)
    no_tpl = make_tiny_model_dir(tmp_path, name="notpl", chat_template=None)
    with pytest.raises(XTFDataError, match="line 1: records use 'messages' but the tokenizer has no chat template"):
        score_dataset(no_tpl, data, tmp_path / "b", progress=False)
    # a base model without LM head
    from transformers import AutoModel, AutoTokenizer

    base = tmp_path / "base"
    AutoModel.from_pretrained(model_dir).save_pretrained(base)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(base)
    with pytest.raises(ValueError, match="no LM head"):
        score_dataset(base, data, tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        score_dataset(tmp_path / "nowhere", data, tmp_path / "c", progress=False)
    # an existing run with other settings is never clobbered without overwrite
    out = tmp_path / "run"
    score_dataset(model_dir, data, out, progress=False)
    before = _files(out)
    from xtf_kernels.xtf import RuleConfig

    with pytest.raises(FileExistsError, match="different settings"):
        score_dataset(model_dir, data, out, batch_size=3, progress=False)  # pass 1 depends on it
    assert _files(out) == before
    s = score_dataset(model_dir, data, out, batch_size=3, rules=RuleConfig(kn_threshold=0.1), overwrite=True,
                      progress=False)
    assert s["thresholds"]["kn"]["threshold"] == 0.1 and "rules_changed" not in s["run"]
    with pytest.raises(ValueError, match="batch_size"):
        score_dataset(model_dir, data, out, batch_size=0)
    with pytest.raises(ValueError, match="max_examples"):
        build_report(out, max_examples=0)


def test_cli_parser_and_demo_hook(capsys):
    from xtf_kernels.cli import build_parser

    ap = build_parser(with_demo=True)
    sub = next(a for a in ap._actions if a.dest == "command")
    assert {"score", "export", "report", "demo"} <= set(sub.choices)
    a = ap.parse_args(["score", "--model", "m", "--data", "d.jsonl", "--out", "o", "--ri-layers", "0,1", "--rules", "kn,tr"])
    assert a.ri_layers == [0, 1] and a.rules == "kn,tr" and a.dtype == "auto"
    with pytest.raises(SystemExit):
        ap.parse_args(["score", "--model", "m"])  # --data and --out are required
    try:
        import xtf_kernels.demo.cli  # noqa: F401
    except ModuleNotFoundError:
        assert main(["demo"]) == 2 and "not available" in capsys.readouterr().err
    assert main(["report", "/nonexistent/run"]) == 2
    assert "summary.json not found" in capsys.readouterr().err


def test_module_api_one_decoder_forward_per_batch_no_logits(model_dir, tmp_path):
    """RI and KN share one decoder forward per batch, and the LM head (logits) never runs."""
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    n = {"dec": 0, "head": 0}
    h1 = m.get_decoder().register_forward_hook(lambda *a: n.__setitem__("dec", n["dec"] + 1))
    h2 = m.get_output_embeddings().register_forward_hook(lambda *a: n.__setitem__("head", n["head"] + 1))
    recs = [{"prompt": f"Q{i}:", "response": t} for i, t in enumerate(SAMPLE_TEXTS)]
    s = score_dataset(m, recs, tmp_path / "o", tokenizer=tok, batch_size=4, progress=False, dtype="fp32", preset="paper")
    h1.remove()
    h2.remove()
    assert n == {"dec": 3, "head": 0}  # 11 examples, batches of 4
    assert s["examples"]["scored"] == len(SAMPLE_TEXTS)
    with pytest.raises(ValueError, match="tokenizer: required"):
        score_dataset(m, recs, tmp_path / "o2")
