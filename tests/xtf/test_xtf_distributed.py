"""torch.distributed (gloo, 2 spawned CPU processes): the output equals a single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests._tiny import SAMPLE_TEXTS, make_tiny_model_dir

pytestmark = pytest.mark.distributed


def _worker(rank: int, world: int, init_file: str, model_dir: str, data: str, out: str, kw: str = "{}") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from xtf_kernels.xtf import score_dataset

        score_dataset(model_dir, data, out, shard_size=2, batch_size=2, progress=False, device="cpu", **json.loads(kw))
    finally:
        dist.destroy_process_group()


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kw", [{"preset": "paper"}, {},
                                {"preset": "paper", "tr_source": "contextual", "ri_aggregation": "debiased",
                                 "protect": [2]}],
                         ids=["paper", "official", "readings"])
def test_two_ranks_equal_single_process(tmp_path, kw):
    """Also under the official preset (per-id occurrence counts reduced as integers, every token's
    relevance, the Multi-Otsu cut) and the contextual TR reading (global domain vector, min/max
    and histogram)."""
    from xtf_kernels.xtf import score_dataset

    model_dir = make_tiny_model_dir(tmp_path)
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for i in range(7):  # 4 shards of 2: rank 0 gets shards 0 and 2, rank 1 gets 1 and 3
            f.write(json.dumps({"prompt": f"Q{i}:", "response": SAMPLE_TEXTS[i]}) + "\n")
    single = tmp_path / "single"
    score_dataset(model_dir, data, single, shard_size=2, batch_size=2, progress=False, device="cpu", **kw)
    multi = tmp_path / "multi"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(model_dir), str(data), str(multi), json.dumps(kw)),
             nprocs=2, join=True)
    a, b = _files(single), _files(multi)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.startswith("tokens/")]) == 4
    for k in a:
        assert a[k] == b[k], k


def _refusing_worker(rank: int, world: int, init_file: str, model_dir: str, data: str, out: str, res: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from xtf_kernels.xtf import score_dataset

        try:  # rank 0 finds a run with other settings in `out`: every rank must fail, none may hang
            score_dataset(model_dir, data, out, shard_size=2, batch_size=3, progress=False, device="cpu")
            outcome = "returned"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        Path(res, f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_a_refusal_on_rank_0_fails_every_rank(tmp_path):
    from xtf_kernels.xtf import score_dataset

    model_dir = make_tiny_model_dir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "response": SAMPLE_TEXTS[i]}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    score_dataset(model_dir, data, out, shard_size=2, batch_size=2, progress=False, device="cpu")
    mp.spawn(_refusing_worker, args=(2, str(tmp_path / "init"), str(model_dir), str(data), str(out), str(tmp_path)),
             nprocs=2, join=True)
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r0.startswith("RunExistsError: ") and "batch_size changed" in r0
    assert r1 == "RankFailedError: rank(s) [0] failed; see the message printed by rank 0"
