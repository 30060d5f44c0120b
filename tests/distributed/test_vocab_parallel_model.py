"""apply_xtf on a tiny Llama whose ``lm_head`` is tensor-parallel (``ColwiseParallel`` over 2
gloo processes, 383 ids: uneven shards): the loss is computed vocabulary-parallel on the
shards (no gathered weight, no logits) and equals one process on the whole model, gradients
included."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from tests._tiny import make_tiny_model  # noqa: E402
from xtf_kernels.integrations.transformers import apply_xtf  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
V = 383
PLANS = (
    "replicate",
    "shard",
)  # ColwiseParallel's output layout: Replicate() or its default Shard(-1)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    keep = torch.rand(2, 9, generator=g) < 0.7
    return dict(input_ids=ids, labels=labels, xtf_keep=keep)


def _model() -> torch.nn.Module:
    return make_tiny_model("llama", vocab_size=V, seed=0).float().train()


def _no_gather(*args, **kwargs):
    raise AssertionError("the LM head weight was gathered")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (WORLD,))
        res = {}
        for plan in PLANS:
            model = _model()
            style = (
                ColwiseParallel(output_layouts=Replicate())
                if plan == "replicate"
                else ColwiseParallel()
            )
            parallelize_module(model, mesh, {"lm_head": style})
            model = apply_xtf(model)
            full_tensor = DTensor.full_tensor
            DTensor.full_tensor = _no_gather  # the loss must not gather the head
            try:
                out = model(**_batch(), xtf_return_stats=True)
                out.loss.backward()
            finally:
                DTensor.full_tensor = full_tensor
            grads = {}
            for k, p in model.named_parameters():
                g = p.grad
                grads[k] = g.full_tensor() if isinstance(g, DTensor) else g
            res[plan] = dict(
                loss=out.loss.detach(),
                logprob=out.xtf_stats.logprob,
                grads=grads,
                local_rows=model.lm_head.weight.to_local().shape[0],
            )
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results() -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(str(Path(tmp) / "init"), tmp), nprocs=WORLD, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("plan", PLANS)
def test_tensor_parallel_head_equals_one_process(tp_results, plan: str) -> None:
    model = apply_xtf(_model())
    out = model(**_batch(), xtf_return_stats=True)
    out.loss.backward()
    assert sorted(r[plan]["local_rows"] for r in tp_results) == [191, 192]
    for rank, r in enumerate(tp_results):
        got = r[plan]
        torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            got["logprob"], out.xtf_stats.logprob, rtol=1e-5, atol=1e-5, equal_nan=True
        )
        for k, p in model.named_parameters():
            torch.testing.assert_close(
                got["grads"][k], p.grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {k}"
            )


def test_the_example_runs() -> None:
    """examples/tp_lm_head.py (docs/training.md): 2 spawned CPU processes train a tiny Llama
    with a ColwiseParallel head, then call masked_ce with VocabParallel."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "tp_lm_head.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 9 loss" in out.stdout and "vocabulary-parallel loss" in out.stdout
    assert "rank 1: lm_head holds 500 of 1001 rows" in out.stdout
