"""A tensor-parallel LM head trained with XTF's loss: the head's rows split over the ranks.

    torchrun --nproc_per_node 2 examples/tp_lm_head.py      # gloo on the CPU, or NCCL on GPUs
    python examples/tp_lm_head.py                            # the same, 2 processes spawned here

Every rank holds the whole (tiny) Llama except ``lm_head``, which ``parallelize_module`` shards
over the vocabulary (``ColwiseParallel``: rank r holds rows ``[start_r, stop_r)``). The patched
model computes its loss with ``masked_ce`` on the local rows: two all-reduces of per-row
statistics, ``dX`` all-reduced in the backward, ``dW`` local; no rank ever holds the
``[tokens, V]`` logits or the whole head. The second part does the same with plain tensors and
``VocabParallel``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from xtf_kernels import VocabParallel, masked_ce
    from xtf_kernels.integrations import apply_xtf

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.split(":")[0], (world,))

    cfg = transformers.LlamaConfig(
        vocab_size=1001,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # the same model on every rank
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    model = apply_xtf(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)  # the same batch on every rank (tensor parallelism)
    ids = torch.randint(3, cfg.vocab_size, (4, 16), generator=g).to(device)
    keep = (torch.rand(4, 16, generator=g) < 0.8).to(device)  # an XTF keep mask
    for step in range(10):
        out = model(input_ids=ids, labels=ids, xtf_keep=keep)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and step % 3 == 0:
            print(f"step {step} loss {out.loss.item():.4f}")
    rows = model.lm_head.weight.to_local().shape[0]
    print(f"rank {rank}: lm_head holds {rows} of {cfg.vocab_size} rows")

    # the same with plain tensors: each rank passes its rows and where they sit
    V, D = 1001, 64
    per = -(-V // world)
    start, stop = rank * per, min(V, (rank + 1) * per)
    hidden = torch.randn(32, D, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, D, generator=g)[start:stop] / D**0.5).to(device).requires_grad_()
    labels = torch.randint(0, V, (32,), generator=g).to(device)
    loss, stats = masked_ce(
        hidden,
        weight,
        labels,
        vocab_parallel=VocabParallel(start, stop),
        label_smoothing=0.1,
        return_stats=True,
    )
    loss.backward()  # hidden.grad: the whole dX (all-reduced); weight.grad: this rank's rows
    if rank == 0:
        print(
            f"vocabulary-parallel loss {loss.item():.4f}, mean entropy {stats.entropy.mean():.3f}"
        )
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    main()


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun
        main()
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        mp.spawn(_spawned, args=(2, free_port), nprocs=2, join=True)
        sys.exit(0)
