"""benchmarks/xtf_quality.py: smoke run on a tiny random-init model and tiny JSONL (no downloads)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests._tiny import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _load_module():
    spec = importlib.util.spec_from_file_location("xtf_quality", ROOT / "benchmarks" / "xtf_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gsm8k_jsonl(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(start, start + n):
            a, b = i % 7 + 2, i % 5 + 3
            f.write(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many apples?",
                                "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}) + "\n")
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_xtf_quality_smoke(tmp_path, lora):
    q = _load_module()
    model = make_tiny_model_dir(tmp_path, "llama")
    train = _gsm8k_jsonl(tmp_path / "train.jsonl", 12)
    test = _gsm8k_jsonl(tmp_path / "test.jsonl", 4, start=100)
    out = tmp_path / "out"
    argv = ["--model", str(model), "--task", "gsm8k", "--train", str(train), "--test", str(test), "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--max-new-tokens", "8", "--device", "cpu",
            "--max-length", "128", "--no-progress"]
    methods = ["--methods", "normal", "xtf", "random", "slm"]
    if lora:  # with a reference model: SLM and Token Cleaning run too
        ref = make_tiny_model_dir(tmp_path, "llama", seed=1, name="ref")
        argv += ["--lora", "--lora-r", "4", "--ref-model", str(ref)]
        methods.append("token_cleaning")
    argv += methods
    assert q.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_train"] == 12 and res["n_test"] == 4 and res["lora"] is lora
    for m in ("normal", "xtf", "random"):  # the demo's results.json key names
        r = res["methods"][m]
        assert 0.0 <= r["exact_match"]["all"] <= 1.0 and r["per_seed"]["all"] == [r["exact_match"]["all"]]
        assert r["std"]["all"] == 0.0 and "kept_noise_share" in r
    assert res["methods"]["normal"]["kept_fraction"] == 1.0
    assert res["methods"]["xtf"]["kept_fraction"] == pytest.approx(res["xtf_kept_ratio"])
    assert abs(res["methods"]["random"]["kept_fraction"] - res["xtf_kept_ratio"]) < 0.05
    if lora:
        for m in ("slm", "token_cleaning"):
            assert 0.0 <= res["methods"][m]["exact_match"]["all"] <= 1.0
            assert res["methods"][m]["kept_fraction"] == pytest.approx(res["xtf_kept_ratio"], abs=0.05)
    else:
        assert "skipped" in res["methods"]["slm"]  # no --ref-model
    assert (out / "table.md").read_text().startswith("| method |")
    assert list((out / "xtf_scores" / "tokens").glob("shard-*.parquet"))


def test_xtf_quality_parsing_and_bad_input(tmp_path):
    q = _load_module()
    assert q.extract("so 3 + 4 = 7. The answer is 1,234.", "gsm8k") == "1234"
    assert q.extract("The answer is maybe.", "pubmedqa") == "maybe"
    assert q.extract("no final answer", "gsm8k") is None
    p, r, g = q._gsm8k({"question": "Q?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}, "x")
    assert p == "Question: Q?\nAnswer:" and r == " 2 + 2 = 4 The answer is 4." and g == "4"
    p, r, g = q._pubmedqa({"QUESTION": "q", "CONTEXTS": ["a", "b"], "LONG_ANSWER": "la", "final_decision": "yes"}, "x")
    assert "Context: a b" in p and r.endswith("The answer is yes.") and g == "yes"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        q.load_task(bad, "gsm8k")
    with pytest.raises(ValueError, match="task"):
        q.load_task(bad, "nope")
