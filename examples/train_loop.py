"""Train a causal LM with XTF keep masks in a plain PyTorch loop (gradient accumulation included).

    python examples/train_loop.py --steps 20 --grad-accum 4                 # tiny random model
    python examples/train_loop.py --model ./my-llama --data export.jsonl    # your checkpoint + data
    torchrun --nproc_per_node 2 examples/train_loop.py --steps 5            # DDP (gloo on CPU)

``--data`` is JSONL with ``input_ids``, ``labels`` (-100 = not trained) and optionally ``keep``
(per-token 0/1, False = noisy token): what ``xtf export`` writes. Without it, synthetic
records are generated. The loop is the part to copy:

    apply_xtf(model)                                  # loss by masked_ce, no logits
    n = global_num_items(micro_batches)               # kept tokens of the step, all ranks
    for b in micro_batches:
        model(**b, num_items_in_batch=n).loss.backward()
    optimizer.step()
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from xtf_kernels.integrations import XTFCollator, apply_xtf, global_num_items  # noqa: E402


def tiny_model(vocab: int, seed: int) -> torch.nn.Module:
    """A 2-layer random-init Llama (hidden 64): nothing is downloaded."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def synthetic_records(n: int, vocab: int, seed: int) -> list[dict]:
    """Prompt + a response that repeats a short pattern (learnable), with ~25% tokens masked."""
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 5))]
        pattern = [rng.randrange(3, vocab) for _ in range(3)]
        resp = (pattern * 6)[: rng.randint(8, 16)]
        ids = prompt + resp
        labels = [-100] * len(prompt) + resp
        keep = [1] * len(prompt) + [int(rng.random() > 0.25) for _ in resp]
        recs.append({"input_ids": ids, "labels": labels, "keep": keep})
    return recs


def read_jsonl(path: Path) -> list[dict]:
    recs = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{i}: not valid JSON ({exc})") from exc
    if not recs:
        raise SystemExit(f"{path}: no records")
    return recs


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="local HF checkpoint dir (default: tiny random Llama)")
    ap.add_argument("--data", type=Path, help="JSONL records: input_ids, labels, keep")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dynamic", action="store_true", help="also mask tokens the model already knows (KN rule)")
    ap.add_argument("--out", type=Path, help="write losses.json here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1:
        ap.error("--steps, --batch-size and --grad-accum must be >= 1")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")

    if args.model is not None:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        vocab = model.config.get_text_config().vocab_size
        pad = model.config.get_text_config().pad_token_id or 0
    else:
        vocab, pad = 512, 0
        model = tiny_model(vocab, args.seed)
    records = read_jsonl(args.data) if args.data else synthetic_records(64, vocab, args.seed)
    records = records[rank::world]  # this rank's shard

    select = None
    if args.dynamic:
        from xtf_kernels.xtf.dynamic import DynamicXTF

        select = DynamicXTF(kn_threshold=0.05)
    apply_xtf(model, select=select)
    model.to(device).train()
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    collate = XTFCollator(pad)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed + rank)
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train", disable=rank != 0)
    for _step in bar:
        micro = [
            {k: v.to(device) for k, v in collate(rng.sample(records, min(args.batch_size, len(records)))).items()}
            for _ in range(args.grad_accum)
        ]
        # divisor of the whole step: kept tokens over all micro-batches and ranks
        n = global_num_items(micro)
        step_loss = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1 or not distributed
            ctx = model.no_sync() if not sync else torch.enable_grad()
            with ctx:
                loss = model(**b, num_items_in_batch=n).loss
                loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if select is not None:
            select.end_step()
        value = float(step_loss) / world  # this rank's share of the global mean
        if distributed:
            t = torch.tensor(value, device=device)
            dist.all_reduce(t)
            value = float(t)
        if not math.isfinite(value):
            raise SystemExit(f"non-finite loss at step {_step}: {value}")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    if rank == 0:
        print(json.dumps({"first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses)}))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            extra = {"dynamic_history": select.history} if select is not None else {}
            (args.out / "losses.json").write_text(json.dumps({"losses": losses, **extra}, indent=1))
    if distributed:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
