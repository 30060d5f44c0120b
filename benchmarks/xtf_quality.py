"""XTF vs normal fine-tuning (and token-level baselines) on YOUR local model and data.

The demo's protocol for a real model: score the training split with XTF using the frozen base
model (``xtf_kernels.xtf.score_dataset``), fine-tune a fresh copy of the base per method with
the same steps, batch order and seed (full fine-tuning, or LoRA via ``peft``), all on
``xtf_kernels.masked_ce``, then evaluate exact-match accuracy of the final answer on the test
split with greedy decoding (GSM8K: the number; PubMedQA: yes / no / maybe). Nothing is
downloaded: ``--model`` is a local Hugging Face checkpoint directory, the data local JSONL.

Data formats (``--task``):
  gsm8k     {"question": str, "answer": "... #### 72"}  (the "#### N" becomes "The answer is N.")
  pubmedqa  {"question", "context" (str, list or {"contexts": [...]}), "long_answer", "final_decision"}
            (upper-case PubMedQA keys QUESTION / CONTEXTS / LONG_ANSWER also work)
  generic   {"prompt": str, "response": str, "answer": str}  (answer matched after "The answer is")

Example (one GPU, Llama-3.2-1B, LoRA)::

    python benchmarks/xtf_quality.py --model ~/models/Llama-3.2-1B --task gsm8k \\
        --train gsm8k/train.jsonl --test gsm8k/test.jsonl --out runs/gsm8k-1b \\
        --lora --steps 1000 --batch-size 16 --lr 2e-4 --methods normal xtf random

SLM and Token Cleaning need a reference model trained on clean data (``--ref-model DIR``);
without one they are skipped. Outputs: ``results.json``, ``table.md`` and the XTF scores.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

METHODS = ("normal", "xtf", "random", "slm", "token_cleaning")


def _gsm8k(rec: dict, where: str) -> tuple[str, str, str]:
    if not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
        raise ValueError(f"{where}: expected GSM8K fields 'question' and 'answer' (str)")
    body, sep, gold = rec["answer"].rpartition("####")
    if not sep:
        raise ValueError(f"{where}: GSM8K answer has no '#### N' final answer")
    gold = gold.strip().replace(",", "")
    steps = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"Question: {rec['question'].strip()}\nAnswer:", f" {steps} The answer is {gold}.", gold


def _pubmedqa(rec: dict, where: str) -> tuple[str, str, str]:
    g = {k.lower(): v for k, v in rec.items()}
    ctx = g.get("context", g.get("contexts"))
    if isinstance(ctx, dict):
        ctx = ctx.get("contexts", [])
    if isinstance(ctx, list):
        ctx = " ".join(str(c) for c in ctx)
    q, dec, long = g.get("question"), g.get("final_decision"), g.get("long_answer", "")
    if not isinstance(q, str) or not isinstance(ctx, str) or dec not in ("yes", "no", "maybe"):
        raise ValueError(f"{where}: expected PubMedQA fields question, context(s), final_decision in yes/no/maybe")
    return (f"Context: {ctx.strip()}\nQuestion: {q.strip()}\nAnswer (yes, no or maybe):",
            f" {str(long).strip()} The answer is {dec}.", dec)


def _generic(rec: dict, where: str) -> tuple[str, str, str]:
    for k in ("prompt", "response", "answer"):
        if not isinstance(rec.get(k), str):
            raise ValueError(f"{where}: expected a str field {k!r}")
    return rec["prompt"], rec["response"], rec["answer"].strip()


_TASKS = {"gsm8k": _gsm8k, "pubmedqa": _pubmedqa, "generic": _generic}


def load_task(path: str | Path, task: str, limit: int | None = None) -> list[dict]:
    """Read a JSONL file into ``{"prompt", "response", "gold"}`` records.

    Args:
        path: JSONL file.
        task: ``"gsm8k"``, ``"pubmedqa"`` or ``"generic"``.
        limit: keep the first ``limit`` records (None: all).

    Raises:
        ValueError: unknown task, malformed line (with its line number) or no records.
    """
    if task not in _TASKS:
        raise ValueError(f"task: expected one of {sorted(_TASKS)}, got {task!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data: {p} does not exist")
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: invalid JSON ({e})") from e
            prompt, response, gold = _TASKS[task](rec, f"{p}:{i}")
            out.append({"prompt": prompt, "response": response, "gold": gold})
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"data: {p} has no records")
    return out


def extract(text: str, task: str) -> str | None:
    """The final answer in a generation: after "The answer is" (numbers without commas)."""
    m = re.search(r"The answer is\s*\$?\s*(-?[\d,]*\.?\d+|yes|no|maybe)", text)
    if not m:
        return None
    a = m.group(1).replace(",", "")
    if task == "gsm8k":
        try:
            v = float(a)
        except ValueError:
            return None
        return str(int(v)) if v == int(v) else str(v)
    return a


def _load(model_dir: str, dtype: torch.dtype, device: torch.device):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return model.to(device), tok


def _token_table(out: Path) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((out / "tokens").glob("shard-*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files])
    cols = {c: t[c].to_numpy() for c in t.column_names if c != "token_text"}
    order = np.lexsort((cols["position"], cols["example_id"]))
    return {k: v[order] for k, v in cols.items()}


def run(args: argparse.Namespace) -> dict:
    """Run the protocol described in the module docstring; returns the results dict."""
    from xtf_kernels.demo.train import Batchable, greedy_answers, train
    from xtf_kernels.xtf import RandomPolicy, SLMPolicy, TokenCleaningPolicy, score_dataset

    methods = list(dict.fromkeys(args.methods))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; expected some of {METHODS}")
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int")
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported() and not args.fp32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_recs = load_task(args.train, args.task, args.limit_train)
    test_recs = load_task(args.test, args.task, args.limit_test)
    torch.manual_seed(args.seed)

    # 1. XTF scores (and the reference model's log-probs) with the frozen base model
    t0 = time.perf_counter()
    base, tok = _load(args.model, torch.float32, dev)
    ref = _load(args.ref_model, torch.float32, dev)[0] if args.ref_model else None
    summary = score_dataset(base, [{"prompt": r["prompt"], "response": r["response"]} for r in train_recs],
                            out / "xtf_scores", tokenizer=tok, ref_model=ref, batch_size=args.score_batch_size,
                            dtype="bf16" if use_bf16 else "fp32", device=dev, overwrite=True,
                            max_length=args.max_length, progress=not args.no_progress)
    del ref, base
    table = _token_table(out / "xtf_scores")
    resp, ex = table["is_response"].astype(bool), table["example_id"]
    xtf_keep = table["keep"].astype(bool)
    ratio = float(xtf_keep.sum() / max(resp.sum(), 1))
    ids_u, starts = np.unique(ex, return_index=True)
    bounds = list(starts) + [ex.size]
    seqs = [table["token_id"][bounds[i] : bounds[i + 1]].astype(np.int64).tolist() for i in range(ids_u.size)]
    n_prompt = [int((~resp[bounds[i] : bounds[i + 1]]).sum()) for i in range(ids_u.size)]

    def split(flat: np.ndarray) -> list[np.ndarray]:
        return [flat[bounds[i] : bounds[i + 1]] for i in range(ids_u.size)]

    rand_keep = RandomPolicy(ratio, seed=args.seed).keep_mask({"token_id": table["token_id"]}, resp)
    specs: dict[str, dict] = {"normal": {}, "xtf": {"keep": split(xtf_keep)}, "random": {"keep": split(rand_keep)}}
    has_ref = "ref_logprob" in table and not np.all(np.isnan(table["ref_logprob"][resp]))
    if has_ref:
        base_ratio = ratio if args.baseline_ratio is None else args.baseline_ratio
        # Token Cleaning: influence = loss_base - loss_ref = ref_logprob - logprob (keep the top)
        tc = TokenCleaningPolicy(base_ratio).keep_mask(table, resp)
        specs["token_cleaning"] = {"keep": split(tc)}
        specs["slm"] = {"select": SLMPolicy(base_ratio), "ref": split(table["ref_logprob"])}
    score_s = time.perf_counter() - t0

    # 2. one fine-tuning run per method from the same base, then greedy exact match
    results: dict[str, dict] = {}
    for m in methods:
        if m not in specs:
            results[m] = {"skipped": "needs --ref-model (a reference model trained on clean data)"}
            print(f"{m}: skipped (needs --ref-model)", file=sys.stderr)
            continue
        t = time.perf_counter()
        model, _ = _load(args.model, torch.float32, dev)
        if args.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        data = Batchable(seqs, n_prompt, keep=specs[m].get("keep"), ref_logprobs=specs[m].get("ref"))
        losses = train(model, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       select=specs[m].get("select"), desc=m, progress=not args.no_progress,
                       max_len=args.max_length, autocast_dtype=torch.bfloat16 if use_bf16 else None)
        train_s = time.perf_counter() - t
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            gens = greedy_answers(model, tok, [r["prompt"] for r in test_recs], max_new_tokens=args.max_new_tokens,
                                  batch_size=args.eval_batch_size)
        acc = float(np.mean([extract(g, args.task) == r["gold"] for g, r in zip(gens, test_recs)]))
        # the demo's results.json key names; one seed, and real data has no template groups (so no
        # exact_match.seen / .new) and no ground-truth noise labels (kept_noise_share is None)
        results[m] = {"exact_match": {"all": acc}, "per_seed": {"all": [acc]}, "std": {"all": 0.0},
                      "kept_fraction": float(np.mean(np.concatenate(specs[m]["keep"])[resp]))
                      if "keep" in specs[m] else (1.0 if m == "normal" else base_ratio),
                      "kept_noise_share": None,
                      "final_loss": float(np.mean(losses[-10:])), "train_s": train_s, "samples": gens[:3]}
        print(f"{m:<15} exact match {100 * acc:5.1f}%  kept {results[m]['kept_fraction']:.1%}", flush=True)
        del model
    res = {"model": args.model, "task": args.task, "train": args.train, "test": args.test, "lora": args.lora,
           "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "n_train": len(train_recs), "n_test": len(test_recs), "xtf_kept_ratio": ratio,
           "xtf_masked": summary.get("masked"), "diagnostics": summary.get("diagnostics"), "score_s": score_s,
           "device": str(dev), "methods": results}
    (out / "results.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    lines = ["| method | exact match % | kept tokens % |", "|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {100 * r['exact_match']['all']:.1f} | {100 * r['kept_fraction']:.1f} |" if "exact_match" in r
                     else f"| {m} | skipped | - |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"results: {out / 'results.json'}")
    return res


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face *ForCausalLM checkpoint directory")
    p.add_argument("--task", choices=sorted(_TASKS), required=True)
    p.add_argument("--train", required=True, help="training JSONL")
    p.add_argument("--test", required=True, help="test JSONL")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {METHODS}")
    p.add_argument("--ref-model", default=None, help="reference model directory (SLM, Token Cleaning)")
    p.add_argument("--lora", action="store_true", help="LoRA (peft, all linear layers) instead of full FT")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5, help="peak LR (use ~2e-4 with --lora)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-ratio", type=float, default=None, help="kept fraction for SLM / TC (default: XTF's)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--score-batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on the GPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0, or 2 with a one-line message on bad input."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"xtf_quality: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
