"""Peak memory and time of one training step with and without ``apply_xtf``.

A small Llama with a large vocabulary (default D=512, V=128256 like Llama 3, 2 layers) and
one micro-batch of 4096 tokens. Cases, each in its own subprocess so peaks do not mix:

* ``hf``: the unpatched model (HF's loss on materialised fp32 logits);
* ``xtf``: ``apply_xtf(model)``, every response token kept;
* ``xtf_keep50``: ``apply_xtf`` with a keep mask that masks half of the tokens.

A step is forward + backward + SGD update, after one warm-up step. On CPU we report the
process's peak RSS (``ru_maxrss``) and the step's own peak above the pre-step RSS (sampled
every 2 ms from /proc/self/statm); on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/train_step_memory.py                     # CPU, writes benchmarks/results/
    python benchmarks/train_step_memory.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("hf", "xtf", "xtf_keep50")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def __enter__(self) -> _PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def run_case(case: str, args: argparse.Namespace) -> dict:
    """Run one case in this process and return its measurements."""
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from xtf_kernels.integrations import apply_xtf

    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dev, dtype).train()
    if case != "hf":
        apply_xtf(model)
    B = args.tokens // args.seq
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (B, args.seq), generator=g).to(dev)
    labels = ids.clone()
    labels[:, : args.seq // 8] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels}
    if case == "xtf_keep50":
        batch["xtf_keep"] = (torch.rand(B, args.seq, generator=g) < 0.5).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (allocator, kernels, backend choice)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_bytes()
    times, losses = [], []
    with _PeakSampler() as sampler:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step())
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {
        "case": case,
        "device": dev.type,
        "dtype": args.dtype,
        "tokens": B * args.seq,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "layers": args.layers,
        "step_s_median": sorted(times)[len(times) // 2],
        "step_s_all": times,
        "loss": losses[-1],
        "rss_before_step_mib": base / 2**20,
        "step_peak_over_base_mib": (sampler.peak - base) / 2**20,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dev.type == "cuda":
        out["cuda_peak_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.tokens % args.seq:
        ap.error("--tokens must be a multiple of --seq")
    if args.case:  # child: one case, JSON on the last stdout line
        print(json.dumps(run_case(args.case, args)))
        return

    from tqdm.auto import tqdm

    load_before = os.getloadavg()
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--cases")]
    skip = False
    child_args = []
    for a in passthrough:  # drop "--cases x y" from what the children get
        if a == "--cases":
            skip = True
            continue
        if skip and a.startswith("--"):
            skip = False
        if not skip:
            child_args.append(a)
    for case in tqdm(args.cases, desc="cases"):
        proc = subprocess.run(
            [sys.executable, __file__, "--case", case, *child_args],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_step_memory_{args.device.split(':')[0]}"
    meta = {
        "host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "note": "CPU is shared with other jobs; step times vary with the load",
    }
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = [k for k in rows[0] if k != "step_s_all"]
    with (args.out / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    mem_key = "cuda_peak_alloc_mib" if args.device.startswith("cuda") else "step_peak_over_base_mib"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        names = [r["case"] for r in rows]
        a1.bar(names, [r[mem_key] for r in rows], color=["#888", "#2a7", "#27a"][: len(rows)])
        a1.set_ylabel("MiB")
        a1.set_title("step peak memory" + (" (over pre-step RSS)" if mem_key.startswith("step") else ""))
        a2.bar(names, [r["step_s_median"] for r in rows], color=["#888", "#2a7", "#27a"][: len(rows)])
        a2.set_ylabel("s")
        a2.set_title("step time (median)")
        fig.suptitle(
            f"train step, D={args.hidden}, V={args.vocab}, {args.tokens} tokens, "
            f"{args.device} {args.dtype}", fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(args.out / f"{stem}.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
    for r in rows:
        print(f"{r['case']:>11}: {r[mem_key]:9.0f} MiB step peak, process peak {r['process_peak_rss_mib']:.0f} MiB, "
              f"{r['step_s_median']:.2f} s/step, loss {r['loss']:.4f}")
    print(f"loadavg before {load_before}, after {load_after}")


if __name__ == "__main__":
    main()
