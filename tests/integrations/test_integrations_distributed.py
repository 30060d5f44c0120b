"""2 gloo processes x 2 micro-batches == 1 process on the whole batch (DDP and FSDP2).

The kept-token counts differ across ranks and micro-batches, so a per-rank or per-micro-batch
mean would give different gradients: only the global divisor of ``global_num_items`` passes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from tests._tiny import make_tiny_model  # noqa: E402
from xtf_kernels.integrations.distributed import count_kept_tokens, global_num_items  # noqa: E402
from xtf_kernels.integrations.transformers import apply_xtf  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
MICRO = 2
V = 384
MODES = ("ddp", "fsdp2")


def _micro_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank 0 keeps ~90% of its tokens, rank 1 ~25%; lengths and prompts differ too."""
    out = []
    for m in range(MICRO):
        g = torch.Generator().manual_seed(100 * rank + m)
        B, L = 2, 9 + 3 * m
        ids = torch.randint(3, V, (B, L), generator=g)
        labels = ids.clone()
        labels[:, : 2 + rank] = -100
        keep = torch.rand(B, L, generator=g) < (0.9 if rank == 0 else 0.25)
        out.append({"input_ids": ids, "labels": labels, "xtf_keep": keep})
    return out


def _model() -> torch.nn.Module:
    m = make_tiny_model("llama", vocab_size=V, seed=0).float().train()
    return apply_xtf(m)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        batches = _micro_batches(rank)
        n = global_num_items(batches)  # one all_reduce; count / world (gradients are averaged)
        for mode in MODES:
            model = _model()
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                wrapped = DistributedDataParallel(model)
                for i, b in enumerate(batches):
                    if i < len(batches) - 1:
                        with wrapped.no_sync():
                            wrapped(**b, num_items_in_batch=n).loss.backward()
                    else:
                        wrapped(**b, num_items_in_batch=n).loss.backward()
                grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (WORLD,))
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                for i, b in enumerate(batches):
                    model.set_requires_gradient_sync(i == len(batches) - 1)
                    model(**b, num_items_in_batch=n).loss.backward()
                grads = {k: p.grad.full_tensor().detach().clone() for k, p in model.named_parameters()}
            if rank == 0:
                torch.save(grads, Path(out_dir) / f"{mode}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def multi_process_grads() -> dict[str, dict[str, torch.Tensor]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        return {m: torch.load(Path(tmp) / f"{m}.pt") for m in MODES}


def _single_process_grads() -> dict[str, torch.Tensor]:
    model = _model()
    everything = [b for r in range(WORLD) for b in _micro_batches(r)]
    n = global_num_items(everything)  # no process group: the exact count
    for b in everything:
        model(**b, num_items_in_batch=n).loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def test_kept_counts_are_uneven() -> None:
    per_rank = [sum(int(count_kept_tokens(b["labels"], b["xtf_keep"])) for b in _micro_batches(r))
                for r in range(WORLD)]
    assert per_rank[0] > 2 * per_rank[1] > 0


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_single_process(multi_process_grads, mode: str) -> None:
    ref = _single_process_grads()
    got = multi_process_grads[mode]
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=f"{mode}: {k}")
    # and a per-rank mean would NOT match (the test can fail)
    model = _model()
    for r in range(WORLD):
        bs = _micro_batches(r)
        n_local = global_num_items(bs)
        for b in bs:
            (model(**b, num_items_in_batch=n_local).loss / WORLD).backward()
    wrong = model.lm_head.weight.grad
    assert not torch.allclose(wrong, ref["lm_head.weight"], rtol=1e-3, atol=1e-5)
