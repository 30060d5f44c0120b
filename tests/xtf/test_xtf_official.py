"""Done-when check of issue 18: ``xtf score`` with no preset flag gives the released rules' masks.

A tiny Llama is trained for a few seconds on math templates (so that KN fires: the model is
confident on the template tokens), then scored by the CLI with its defaults. The test
recomputes the released rules independently from the model, with plain loops: p from the full
softmax of the logits, each token run alone for its relevance, the domain vector from the words
run alone, scikit-image's Multi-Otsu over every occurrence, the cumulative pick, the per-sequence
caps with Python's ``sorted``. The keep masks must agree token by token.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from tests._tiny import make_tiny_model_dir
from xtf_kernels.cli import main
from xtf_kernels.xtf import load_token_table

GSM8K_WORDS = [str(i) for i in range(1, 11)] + ["+", "-", "*", "/", "=", "maths"]
NAMES = ["Tom", "Ann", "Bob", "Eve", "Sam", "Kim"]
ITEMS = ["apples", "pens", "books", "cards"]


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, what = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have? "
        response = f"{who} starts with {a} {what}. Then {who} gets {b} more {what}. So {a} + {b} = {a + b}. The answer is {a + b}."
        out.append({"prompt": prompt, "response": response})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model directory, data path): a tiny Llama trained on the templates (seeded, ~seconds)."""
    import transformers

    root = tmp_path_factory.mktemp("official")
    recs = _records(48)
    texts = [r["prompt"] + r["response"] for r in recs]
    path = make_tiny_model_dir(root, texts=texts * 2)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    ids = [tok(t)["input_ids"] for t in texts]
    L = max(len(x) for x in ids)
    batch = torch.full((len(ids), L), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = batch.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(120):
        loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, data


def _released_keep(model_dir, rows: dict[str, np.ndarray], words: list[str]) -> np.ndarray:
    """The released rules recomputed from the model, written apart from the library."""
    import transformers
    from skimage.filters import threshold_multiotsu

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ex, ids, resp = rows["example_id"], rows["token_id"], rows["is_response"]
    seqs = {e: np.flatnonzero(ex == e) for e in np.unique(ex)}
    with torch.no_grad():
        # the domain vector: each word's tokens run alone, mean of the last hidden states, then the mean
        vecs = []
        for w in words:
            t = tok(w, add_special_tokens=False)["input_ids"]
            if t:
                h = model(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states[-1][
                    0
                ]
                vecs.append(h.mean(0))
        domain = torch.stack(vecs).mean(0)
        rel_of = {}
        for t in sorted(set(ids.tolist())):
            h = model(input_ids=torch.tensor([[t]]), output_hidden_states=True).hidden_states[-1][
                0, 0
            ]
            rel_of[t] = torch.nn.functional.cosine_similarity(h[None], domain[None]).item()
        p = np.zeros(len(ids))
        for rows_e in seqs.values():
            x = torch.tensor(ids[rows_e].astype(np.int64))[None]
            probs = torch.softmax(model(input_ids=x).logits[0].double(), dim=-1)
            for i in range(1, len(rows_e)):
                p[rows_e[i]] = probs[i - 1, int(x[0, i])].item()
    every = np.array([rel_of[t] for t in ids.tolist()])  # every occurrence, prompt included
    thr = threshold_multiotsu(every, classes=5)
    props = [float(np.mean(every >= t)) for t in thr]
    cut, acc = thr[-1], 0.0
    for i, share in enumerate(props):
        acc += share
        if acc > 1.0:
            cut = thr[i - 1] if i > 0 else thr[0]
            break
    keep = np.zeros(len(ids), dtype=bool)
    for rows_e in seqs.values():
        r = [j for j in rows_e if resp[j]]
        n = len(r)
        sp = sorted(p[j] for j in r)
        sr = sorted(rel_of[int(ids[j])] for j in r)
        for j in r:
            kn = p[j] > 0.95 and p[j] > sp[int(n * (1 - 0.10))]
            tr = rel_of[int(ids[j])] < cut and rel_of[int(ids[j])] < sr[int(n * 0.05)]
            keep[j] = not (kn or tr)
    return keep



def _score(model_dir, data, out, *extra: str) -> int:
    """``xtf score --model model_dir --data data --out out *extra``; the exit code."""
    return main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), *extra])

def test_default_score_reproduces_the_released_rules(trained, tmp_path, capsys):
    model_dir, data = trained
    out = tmp_path / "out"
    assert (
        _score(model_dir, data, out, "--quiet", "--no-eos", "--domain-words", ",".join(GSM8K_WORDS))
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["preset"] == "official"
        and summary["thresholds"]["tr"]["domain_words"] == GSM8K_WORDS
    )
    t = load_token_table(out)
    rows = {
        c: t[c].to_numpy(zero_copy_only=False)
        for c in ("example_id", "token_id", "is_response", "keep", "reasons")
    }
    assert (
        summary["masked"]["KN"] > 0 and summary["masked"]["TR"] > 0 and summary["masked"]["RI"] == 0
    )
    want = _released_keep(model_dir, rows, GSM8K_WORDS)
    resp = rows["is_response"]
    assert (rows["keep"][resp] == want[resp]).all(), np.flatnonzero(
        rows["keep"][resp] != want[resp]
    )
    assert not rows["keep"][~resp].any()
    # the paper preset masks far more on the same model (uncapped rules)
    paper = tmp_path / "paper"
    assert (
        _score(model_dir, data, paper, "--quiet", "--no-eos", "--preset", "paper")
        == 0
    )
    assert (
        json.loads((paper / "summary.json").read_text())["tokens"]["masked"]
        > summary["tokens"]["masked"]
    )


def test_default_domain_words_are_the_frequent_response_words(trained, tmp_path, capsys):
    model_dir, data = trained
    out = tmp_path / "out"
    assert (
        _score(model_dir, data, out, "--quiet", "--rules", "TR")
        == 0
    )
    printed = capsys.readouterr().out
    words = json.loads((out / "summary.json").read_text())["thresholds"]["tr"]["domain_words"]
    assert len(words) == 16 and ", ".join(words) in printed
    counts = Counter()
    for line in data.read_text().splitlines():
        import re

        counts.update(
            w for w in re.findall(r"[A-Za-z]+|[0-9]|[+\-*/=]", json.loads(line)["response"])
        )
    assert "The" not in words and "is" not in words and "with" not in words  # stop words
    assert [counts[w] for w in words] == sorted((counts[w] for w in words), reverse=True)
    # changing only a rule parameter reuses pass 1 and says so
    assert (
        _score(model_dir, data, out, "--quiet", "--rules", "kn,TR", "--percentages", "0.05,0.2,0.05")
        == 0
    )
    assert (
        "only rule parameters changed (enabled, percentages): reused pass 1"
        in capsys.readouterr().out
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["thresholds"]["percentages"] == [0.05, 0.2, 0.05] and s["thresholds"]["enabled"] == [
        "kn",
        "tr",
    ]


def test_official_report_export_and_received_ri(trained, tmp_path):
    """The report names the preset, the caps, t_TR, the domain words and why RI flags nothing;
    export trains on the keep mask; --ri-source received applies the capped fence (layer 0)."""
    from xtf_kernels.xtf import build_report, export_dataset

    model_dir, data = trained
    out = tmp_path / "out"
    assert (
        _score(model_dir, data, out, "--quiet")
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert "constant" in s["thresholds"]["ri"]["note"] and s["masked"]["RI"] == 0
    page = build_report(out).read_text()
    assert "Preset: official" in page and "t_TR = " in page and "RI as released is constant" in page
    assert ", ".join(s["thresholds"]["tr"]["domain_words"][:3]) in page
    info = export_dataset(out, tmp_path / "train.jsonl")
    assert info["trained"] == s["tokens"]["kept"]
    recv = tmp_path / "recv"
    assert (
        _score(model_dir, data, recv, "--quiet", "--ri-source", "received")
        == 0
    )
    r = json.loads((recv / "summary.json").read_text())
    assert r["settings"]["ri_layers"] == [0] and r["thresholds"]["ri"]["source"] == "received"
    t = load_token_table(recv)
    ri, fence = t["ri"].to_numpy(), t["ri_fence"].to_numpy()
    resp, reasons = t["is_response"].to_numpy(), t["reasons"].to_numpy()
    fired = resp & (ri < fence)
    np.testing.assert_array_equal((reasons & 1) > 0, fired)
    # the cap: at most int(n * 0.05) per sequence (the fence, or sorted_ri[int(n * 0.05)] when more fell below)
    ex = t["example_id"].to_numpy()
    for e in np.unique(ex):
        sel = resp & (ex == e)
        assert fired[sel].sum() <= int(sel.sum() * 0.05)
