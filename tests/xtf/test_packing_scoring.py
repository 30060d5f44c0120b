"""score_dataset(..., pack=True) / xtf score --pack: the records of an unpacked run, fewer positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests._tiny import SAMPLE_TEXTS, make_tiny_model_dir  # noqa: E402
from xtf_kernels.cli import main  # noqa: E402
from xtf_kernels.xtf import load_token_table, score_dataset  # noqa: E402
from xtf_kernels.xtf.rundir import RunExistsError  # noqa: E402
from xtf_kernels.xtf.scorers import uniform_received_mass  # noqa: E402
from xtf_kernels.xtf.scoring.packing import make_packed_batch, packing_counts, plan_rows  # noqa: E402
from xtf_kernels.xtf.scoring.pass1_packed import uniform_received_mass_packed  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("r"), seed=1)


def _data(path: Path, n: int = 13) -> Path:
    """Mixed lengths: 1 to 4 sample texts per response, one chat record in three."""
    g = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            resp = " ".join(SAMPLE_TEXTS[(i + k) % len(SAMPLE_TEXTS)] for k in range(int(g.integers(1, 5))))
            if i % 3 == 0:
                rec = {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": resp}]}
            else:
                rec = {"prompt": f"Q{i}: " + SAMPLE_TEXTS[i % 5][:12], "response": resp}
            f.write(json.dumps(rec) + "\n")
    return path


def _cols(out: Path) -> dict[str, np.ndarray]:
    t = load_token_table(out)
    return {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}


def _assert_same_records(a: dict, b: dict, near: int) -> None:
    for c in ("example_id", "position", "token_id", "is_response"):
        np.testing.assert_array_equal(a[c], b[c], err_msg=c)
    for c in ("ri", "kn", "tr", "logprob", "entropy", "ref_logprob", "ri_fence"):
        if c in a:
            np.testing.assert_allclose(a[c], b[c], rtol=0, atol=TOL, equal_nan=True, err_msg=c)
    differ = int((a["keep"] != b["keep"]).sum())
    assert differ <= near, (differ, near)


def test_plan_rows_first_fit_decreasing():
    lengths = [5, 9, 2, 9, 4, 1, 7]
    rows = plan_rows(lengths, 10)
    assert rows == [[1, 5], [3], [6, 2], [0, 4]]
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert plan_rows(lengths, 10) == rows  # deterministic
    c = packing_counts(lengths, rows, 2)
    assert c == {"tokens": 37, "rows": 4, "positions_padded": 2 * 9 + 2 * 9 + 2 * 4 + 7, "positions_packed": 2 * 10 + 2 * 9}
    with pytest.raises(ValueError, match="lengths"):
        plan_rows([11], 10)


def test_packed_batch_and_uniform_mass_per_document():
    toks = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]]
    b = make_packed_batch([[0, 1, 2], [3]], toks, 0, "cpu")
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert b.attention_mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    got = uniform_received_mass_packed(b.attention_mask, b.position_ids)
    for _, r, s, n in b.spans:
        want = uniform_received_mass(torch.ones(1, n))[0]
        torch.testing.assert_close(got[r, s : s + n], want)
    assert (got[1, 2:] == 0).all()


@pytest.mark.parametrize("kw", [{"preset": "paper"}, {},
                                {"preset": "paper", "ri_aggregation": "debiased", "tr_source": "contextual"}],
                         ids=["paper", "official", "readings"])
def test_packed_records_equal_unpacked(model_dir, ref_dir, tmp_path, kw):
    data = _data(tmp_path / "d.jsonl")
    common = dict(shard_size=5, batch_size=3, max_length=96, dtype="fp32", device="cpu", progress=False,
                  ref_model=ref_dir, **kw)
    s_pad = score_dataset(model_dir, data, tmp_path / "pad", **common)
    s_pack = score_dataset(model_dir, data, tmp_path / "pack", pack=True, **common)
    pk = s_pack["packing"]
    assert "packing" not in s_pad and pk["tokens"] == s_pad["tokens"]["total"]
    assert pk["positions_packed"] < pk["positions_padded"] and 0 < pk["positions_saved"] < 1
    _assert_same_records(_cols(tmp_path / "pad"), _cols(tmp_path / "pack"), pk["near_threshold_tokens"])
    assert json.loads((tmp_path / "pack" / "summary.json").read_text())["packing"] == pk
    assert json.loads((tmp_path / "pack" / "config.json").read_text())["settings"]["pack"] is True
    assert "pack" not in json.loads((tmp_path / "pad" / "config.json").read_text())["settings"]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and "report" not in p.parts}


def test_pack_cli_resume_and_fingerprint(model_dir, tmp_path, capsys):
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    args = ["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--shard-size", "5",
            "--batch-size", "2", "--max-length", "96", "--quiet", "--pack"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "fewer positions than padded batches" in said and "of a threshold" in said
    before = _files(out)
    # an interrupted run: one shard lost in both passes -> rescored to the same bytes
    for sub in ("pass1", "tokens"):
        (out / sub / "shard-00001.parquet").unlink()
    assert main(args) == 0
    assert "resumed: reused 2 of 3 pass-1 shards" in capsys.readouterr().out
    after = _files(out)
    assert sorted(after) == sorted(before)
    for k in before:
        if k != "summary.json":
            assert after[k] == before[k], k
    # pack enters the fingerprint: the same directory without --pack is another run
    with pytest.raises(RunExistsError, match="pack"):
        score_dataset(model_dir, data, out, shard_size=5, batch_size=2, max_length=96, device="cpu", progress=False)


def test_pack_refused_when_attention_ignores_position_ids(model_dir, ref_dir, tmp_path, capsys, monkeypatch):
    """A decoder that drops position_ids: transformers' masks then let the documents see each
    other (the scored model's RI forward masks by itself, RoPE is shift-invariant: only the
    reference model, run with transformers' own masks, leaks)."""
    import transformers

    orig = transformers.LlamaModel.forward

    def no_positions(self, *a, position_ids=None, **k):
        return orig(self, *a, **k)

    monkeypatch.setattr(transformers.LlamaModel, "forward", no_positions)
    data = _data(tmp_path / "d.jsonl", n=3)
    out = tmp_path / "out"
    rc = main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet", "--pack",
               "--ref-model", str(ref_dir), "--preset", "paper"])
    err = capsys.readouterr().err
    assert rc == 2 and "--pack: the attention of the reference model LlamaForCausalLM" in err
    assert "score without --pack" in err
    # official: no RI forward, the scored model's own hidden states (transformers' masks) leak first
    rc = main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet", "--pack"])
    err = capsys.readouterr().err
    assert rc == 2 and "--pack: the attention of LlamaForCausalLM" in err and "hidden states" in err
    assert "Traceback" not in err and not (out / "config.json").exists()
    with pytest.raises(TypeError, match="pack"):
        score_dataset(model_dir, data, out, pack="yes", progress=False)


@pytest.mark.distributed
def test_pack_two_ranks_equal_single_process(model_dir, tmp_path):
    import torch.multiprocessing as mp

    from tests.xtf.test_xtf_distributed import _worker

    data = _data(tmp_path / "d.jsonl", n=7)
    kw = {"pack": True, "max_length": 96}
    score_dataset(model_dir, data, tmp_path / "single", shard_size=2, batch_size=2, progress=False, device="cpu", **kw)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(model_dir), str(data), str(tmp_path / "multi"),
                            json.dumps(kw)), nprocs=2, join=True)
    a, b = _files(tmp_path / "single"), _files(tmp_path / "multi")
    assert sorted(a) == sorted(b) and len([k for k in a if k.startswith("tokens/")]) == 4
    for k in a:
        assert a[k] == b[k], k


def test_benchmark_mixed_records_have_the_drawn_lengths():
    from benchmarks.score_throughput import _ids, _mixed_records, _tokenizer

    recs = _mixed_records(6, 2048, 100)
    assert recs == _mixed_records(6, 2048, 100)  # deterministic
    lens = [len(_ids([r], _tokenizer(100), "cpu")[0]) for r in recs]
    assert all(32 <= n <= 1024 for n in lens) and len(set(lens)) > 1
