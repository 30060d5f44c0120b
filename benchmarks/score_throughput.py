"""What scoring costs: ``score_dataset`` against a forward-pass floor, and packed vs padded attention.

``python -m benchmarks.score_throughput [--lengths 1024 4096 16384] [--threads 2] [--out benchmarks/results]``

Part 1, **scoring** (one fresh subprocess per method and length, same thread count, a random
Llama: hidden 512, 4 layers, 8 heads / 4 KV heads, vocabulary 32000, intermediate 1536; on
CUDA the ``--gpu-preset`` model): the same examples of exactly ``L`` tokens
(``--tokens`` in total, at least one example), in batches of ``--batch-tokens`` tokens:

* ``floor``: a plain SDPA forward of the decoder plus the LM-head GEMM over every position,
  in chunks of ``--head-chunk`` rows; nothing is kept or written. It is what knowledge novelty
  needs anyway (the head for every position) plus the forward pass.
* ``ours``: :func:`xtf_kernels.xtf.score_dataset` end to end (RI, KN, TR, rules, Parquet).
* ``naive``: eager attention with ``output_attentions=True`` and the full ``[B, L, V]``
  logits, then the same per-token numbers from them (RI per query-averaged column sums,
  ``1 - p(gold)``). Skipped, and reported as skipped, where its estimated footprint exceeds
  ``--max-naive-gb``.

Each subprocess warms up on a short batch, then times ``--repeats`` runs (the fastest is
reported, with the median, and the process CPU time of the fastest: on a loaded machine with
one thread per process, CPU seconds are the steadier measure) and reports its peak resident
set (``ru_maxrss``; on CUDA the peak allocation). Results: ``<out>/score_throughput_<device>.csv``.

Part 2, **packed vs padded attention** (``--mixed``, kernel level, in this process): documents
of uniform random length in [32, 1024] tokens, laid out two ways, and
:func:`xtf_kernels.attention.attention_with_received` (a layer's output and its received
attention, what scoring runs per layer) timed on random q/k/v of the model's head shapes:

* ``padded``: batches of ``--pad-batch`` documents in data order, right-padded to the batch's
  longest (what unpacked scoring does);
* ``packed``: first-fit into rows of ``--row`` tokens, documents marked by ``position_ids``
  (block-diagonal attention; blocks in other documents are skipped);
* ``packed-no-skip``: the same rows as one causal document each: the work of a kernel that
  masks the other documents instead of skipping them (its numbers are not the packed ones;
  only its time is).

The target (issue 12): packed faster than padded by at least half the padding share.
Results: ``<out>/score_throughput_mixed_<device>.csv``.

Part 3, **one attention layer** (``--layer``, in this process, B = 1, the model's head shapes,
causal, no padding) at each length: ``sdpa`` (the floor's attention, output only), ``ours``
(:func:`~xtf_kernels.attention.attention_with_received`: output and received attention), and
on the CPU ``lse-reuse`` (the design where a private ATen kernel,
``aten._scaled_dot_product_flash_attention_for_cpu``, returns the output and the row
log-sum-exp, and one extra tiled pass over ``Q K^T`` sums ``exp(s - lse)``). Results:
``<out>/score_throughput_layer_<device>.csv``.

Part 4, **packed vs padded scoring** (``--packed-scoring``, end to end, one fresh subprocess
per layout, the part-1 model): ``--score-docs`` records of uniform random length in [32, 1024]
tokens scored by :func:`~xtf_kernels.xtf.score_dataset` with ``max_length = --row`` twice:

* ``padded``: ``pack=False``, ``--pad-batch`` examples per right-padded batch;
* ``packed``: ``pack=True``, ``--pack-rows`` rows of up to ``--row`` tokens per forward.

Both write the same records (tests/xtf/test_packing_scoring.py); the packed run's
``summary["packing"]`` gives the positions each layout feeds the model. Target (issue 12):
packed faster than padded by at least half the padding share. Results:
``<out>/score_throughput_packed_<device>.csv``.

All parts are plotted in ``<out>/score_throughput_<device>.png`` and printed as tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._child import ROOT, run_child

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("floor", "ours", "naive")
CPU_MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000)
GPU_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=128256)
FIELDS = ["device", "method", "L", "examples", "batch", "threads", "status", "seconds", "seconds_median",
          "vs_floor", "cpu_seconds", "cpu_vs_floor", "tokens_per_s", "peak_mb", "note", "load_avg", "torch", "model"]
LAYER_FIELDS = ["device", "method", "L", "Hq", "Hkv", "Dh", "dtype", "seconds", "seconds_median", "vs_sdpa",
                "threads"]
PACKED_FIELDS = ["device", "layout", "documents", "real_tokens", "positions", "padding_share", "batch", "row",
                 "seconds", "seconds_median", "vs_padded", "tokens_per_s", "peak_mb", "threads", "status", "note"]
MIXED_FIELDS = ["device", "layout", "backend", "documents", "real_tokens", "slots", "padding_share", "rows", "L",
                "seconds", "seconds_median", "vs_padded", "threads", "note"]


# --------------------------------------------------------------------------- the model and data



def _model(spec: dict, L: int, device: str, dtype: str, attn: str):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**spec, max_position_embeddings=max(L, 2048), pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs (fast on a GPU)
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(dtype=getattr(torch, dtype)).eval()
    model.set_attn_implementation(attn)
    return model


def _tokenizer(vocab: int):
    """A word-level tokenizer: the text ``"w5 w17"`` is the ids [5, 17] (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _records(n: int, L: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/response records of exactly ``L`` tokens with the EOS ``score_dataset`` appends."""
    import random

    rng = random.Random(seed)
    n_prompt = max(1, L // 4)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(4, vocab)}" for _ in range(L - 1)]
        out.append({"prompt": " ".join(words[:n_prompt]), "response": " ".join(words[n_prompt:])})
    return out


def _ids(records: list[dict], tok, device: str):
    import torch

    rows = [tok(r["prompt"] + " " + r["response"])["input_ids"] + [tok.eos_token_id] for r in records]
    return torch.tensor(rows, dtype=torch.long, device=device)


# --------------------------------------------------------------------------- one method (child)


def _run_floor(model, ids, batch: int, chunk: int) -> None:
    import torch

    w = model.lm_head.weight
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            h = model.model(input_ids=ids[s : s + batch], use_cache=False).last_hidden_state
            h = h.reshape(-1, h.shape[-1])
            for c in range(0, h.shape[0], chunk):
                torch.matmul(h[c : c + chunk], w.t())
            del h


def _run_naive(model, ids, batch: int) -> None:
    import torch

    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            x = ids[s : s + batch]
            out = model(input_ids=x, output_attentions=True, use_cache=False)
            L = x.shape[1]
            seen = torch.arange(L, 0, -1, device=x.device, dtype=torch.float32)  # causal: L - j queries
            ri = sum(a.float().sum(dim=2).mean(dim=1) for a in out.attentions) / len(out.attentions) / seen
            logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            kn = 1 - logp.gather(-1, x[:, 1:, None]).squeeze(-1).exp()
            del out, logp
            assert bool(torch.isfinite(ri).all()) and bool(torch.isfinite(kn).all())


def _run_ours(model, records, tok, batch: int, L: int, device: str) -> None:
    from xtf_kernels.xtf import score_dataset

    with tempfile.TemporaryDirectory() as d:
        score_dataset(model, records, d, tokenizer=tok, batch_size=batch, max_length=L, device=device,
                      progress=False, overwrite=True)


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    spec = GPU_MODEL if args.device == "cuda" else CPU_MODEL
    attn = {"floor": "sdpa", "ours": "sdpa", "naive": "eager"}[args.method]
    model = _model(spec, args.L, args.device, args.dtype, attn)
    tok = _tokenizer(spec["vocab_size"])
    n = max(1, args.tokens // args.L)
    batch = max(1, min(n, args.batch_tokens // args.L))
    records = _records(n, args.L, spec["vocab_size"])
    warm = _records(1, min(args.L, 256), spec["vocab_size"], seed=1)
    ids = _ids(records, tok, args.device) if args.method != "ours" else None

    def once(recs, x) -> None:
        if args.method == "floor":
            _run_floor(model, x if x is not None else _ids(recs, tok, args.device), batch, args.head_chunk)
        elif args.method == "naive":
            _run_naive(model, x if x is not None else _ids(recs, tok, args.device), batch)
        else:
            _run_ours(model, recs, tok, batch, args.L, args.device)

    once(warm, None)
    times, cpu = [], []
    for _ in range(args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        once(records, ids)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": min(times), "seconds_median": statistics.median(times), "cpu_seconds": min(cpu),
                      "peak_mb": peak, "examples": n, "batch": batch}))


# --------------------------------------------------------------------------- part 1 driver


def _naive_gb(spec: dict, L: int, batch: int, itemsize: int) -> float:
    """All layers' [B, H, L, L] probabilities, one layer's scores, and [B, L, V] logits (+ fp32 copy)."""
    H, layers, V = spec["num_attention_heads"], spec["num_hidden_layers"], spec["vocab_size"]
    return (batch * H * L * L * (layers * itemsize + 8) + batch * L * V * (itemsize + 8)) / 2**30


def _load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return ""


def run_scoring(args: argparse.Namespace) -> list[dict]:
    import torch

    spec = GPU_MODEL if args.device == "cuda" else CPU_MODEL
    itemsize = 2 if args.dtype in ("bfloat16", "float16") else 4
    rows: list[dict] = []
    for L in args.lengths:
        n = max(1, args.tokens // L)
        batch = max(1, min(n, args.batch_tokens // L))
        for method in args.methods:
            row = dict(device=args.device, method=method, L=L, examples=n, batch=batch, threads=args.threads,
                       status="ok", seconds="", seconds_median="", vs_floor="", cpu_seconds="", cpu_vs_floor="",
                       tokens_per_s="", peak_mb="",
                       note="", load_avg=_load_avg(), torch=torch.__version__,
                       model=",".join(f"{k}={v}" for k, v in spec.items()) + f",{args.dtype}")
            est = _naive_gb(spec, L, batch, itemsize)
            if method == "naive" and est > args.max_naive_gb:
                row.update(status="skipped", note=f"needs ~{est:.0f} GiB (> --max-naive-gb {args.max_naive_gb:g})")
                rows.append(row)
                print(f"{method:6s} L={L:6d}: skipped ({row['note']})", flush=True)
                continue
            cmd = [sys.executable, "-m", "benchmarks.score_throughput", "--child", "--method", method,
                   "--lengths", str(L), "--tokens", str(args.tokens), "--batch-tokens", str(args.batch_tokens),
                   "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
                   "--repeats", str(args.repeats), "--head-chunk", str(args.head_chunk)]
            out, failure = run_child(cmd, args.timeout)
            if failure is not None:
                row.update(failure)
                if failure["status"] == "timeout":
                    rows.append(row)
                    continue
            else:
                row.update(seconds=round(out["seconds"], 3), seconds_median=round(out["seconds_median"], 3),
                           cpu_seconds=round(out["cpu_seconds"], 3), peak_mb=round(out["peak_mb"]),
                           tokens_per_s=round(n * L / out["seconds"]))
            rows.append(row)
            print(f"{method:6s} L={L:6d}: {row['status']} {row['seconds']} s, peak {row['peak_mb']} MB {row['note']}",
                  flush=True)
    for r in rows:
        floor = next((f for f in rows if f["method"] == "floor" and f["L"] == r["L"] and f["status"] == "ok"), None)
        if floor and r["status"] == "ok":
            r["vs_floor"] = round(r["seconds"] / floor["seconds"], 3)
            r["cpu_vs_floor"] = round(r["cpu_seconds"] / floor["cpu_seconds"], 3)
    return rows


# --------------------------------------------------------------------------- part 2: packed vs padded


def _layouts(n_docs: int, row: int, pad_batch: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Document lengths per row for the padded and packed layouts (deterministic)."""
    import random

    rng = random.Random(seed)
    lens = [rng.randint(32, min(1024, row)) for _ in range(n_docs)]
    padded = [lens[i : i + pad_batch] for i in range(0, n_docs, pad_batch)]
    packed: list[list[int]] = []
    for n in lens:  # first fit, in data order
        for r in packed:
            if sum(r) + n <= row:
                r.append(n)
                break
        else:
            packed.append([n])
    return {"padded": padded, "packed": packed}


def _time_layout(layout: str, groups: list[list[int]], row: int, spec: dict, device: str, dtype: str,
                 backend: str, repeats: int) -> list[float]:
    import torch

    from xtf_kernels.attention import attention_with_received

    Hq, Hkv = spec["num_attention_heads"], spec["num_key_value_heads"]
    Dh = spec["hidden_size"] // Hq
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    calls = []
    if layout == "padded":
        for grp in groups:  # one padded batch per group of documents
            B, L = len(grp), max(grp)
            mask = (torch.arange(L)[None, :] < torch.tensor(grp)[:, None]).to(device)
            calls.append((B, L, dict(attention_mask=mask)))
    else:
        B, L = len(groups), row
        pos = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, docs in enumerate(groups):
            s = 0
            for n in docs:
                pos[b, s : s + n] = torch.arange(n)
                s += n
            mask[b, :s] = 1
        kw = dict(attention_mask=mask.to(device))
        if layout == "packed":
            kw["position_ids"] = pos.to(device)
        calls.append((B, L, kw))
    tensors = []
    for B, L, kw in calls:
        q = torch.randn(B, Hq, L, Dh, device=device, dtype=dt, generator=g)
        k = torch.randn(B, Hkv, L, Dh, device=device, dtype=dt, generator=g)
        v = torch.randn(B, Hkv, L, Dh, device=device, dtype=dt, generator=g)
        tensors.append((q, k, v, kw))

    def once() -> None:
        for q, k, v, kw in tensors:
            attention_with_received(q, k, v, backend=backend, **kw)
        if device == "cuda":
            torch.cuda.synchronize()

    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return times


def run_mixed(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    spec = GPU_MODEL if args.device == "cuda" else CPU_MODEL
    backend = "triton" if args.device == "cuda" else "torch"
    lay = _layouts(args.docs, args.row, args.pad_batch)
    real = sum(sum(r) for r in lay["padded"])
    rows = []
    for layout in ("padded", "packed", "packed-no-skip"):
        groups = lay["padded" if layout == "padded" else "packed"]
        slots = sum(len(g) * max(g) for g in groups) if layout == "padded" else len(groups) * args.row
        times = _time_layout(layout, groups, args.row, spec, args.device, args.dtype, backend, args.repeats)
        rows.append(dict(device=args.device, layout=layout, backend=backend, documents=args.docs, real_tokens=real,
                         slots=slots, padding_share=round(1 - real / slots, 4), rows=len(groups),
                         L=args.row if layout != "padded" else "max of batch", seconds=round(min(times), 4),
                         seconds_median=round(statistics.median(times), 4), vs_padded="", threads=args.threads,
                         note=""))
        print(f"{layout:15s}: {rows[-1]['seconds']} s (padding share {rows[-1]['padding_share']:.1%})", flush=True)
    pad = rows[0]
    for r in rows:
        r["vs_padded"] = round(r["seconds"] / pad["seconds"], 3)
    target = 1 - pad["padding_share"] / 2
    rows[1]["note"] = (f"target: <= {target:.3f} x padded (half the padding share); "
                       f"{'met' if rows[1]['vs_padded'] <= target else 'NOT met'}")
    rows[2]["note"] = "same rows as one causal document each: the cost of masking instead of skipping"
    return rows


# --------------------------------------------------------------------------- part 3: one layer


def _received_from_lse(q, k, lse, scale: float, T: int = 256):
    """Sum over queries of ``exp(s - lse)`` by [T x T] tiles (causal): the pass that reuses a forward's lse."""
    import torch

    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg, lg = q.unflatten(1, (Hkv, G)), lse.unflatten(1, (Hkv, G))
    out = torch.zeros(B, Hkv, G, L, device=q.device)
    above = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    for k0 in range(0, L, T):
        k1 = min(L, k0 + T)
        kt = k[:, :, k0:k1].transpose(-1, -2)
        acc = torch.zeros(B, Hkv, G, k1 - k0, device=q.device)
        for q0 in range(k0, L, T):
            q1 = min(L, q0 + T)
            n = q1 - q0
            s = torch.matmul(qg[:, :, :, q0:q1].reshape(B, Hkv, G * n, D), kt).view(B, Hkv, G, n, k1 - k0)
            p = s.mul_(scale).sub_(lg[..., q0:q1, None]).exp_()
            if q0 == k0:
                p.masked_fill_(above[:n, : k1 - k0], 0.0)
            acc += p.sum(dim=-2)
        out[..., k0:k1] = acc
    return out.flatten(1, 2)


def _layer_methods(q, k, v, device: str) -> dict:
    """name -> zero-argument callable computing one causal layer on (q, k, v)."""
    import torch
    import torch.nn.functional as F

    from xtf_kernels.attention import attention_with_received

    scale = q.shape[-1] ** -0.5
    methods = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "ours": lambda: attention_with_received(q, k, v),
    }
    if device == "cpu":
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

        def lse_reuse():
            out, lse = op(q, k, v, 0.0, True, scale=scale)
            return out, _received_from_lse(q, k, lse, scale)

        methods["lse-reuse"] = lse_reuse
    return methods


def run_layer(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    spec = GPU_MODEL if args.device == "cuda" else CPU_MODEL
    Hq, Hkv = spec["num_attention_heads"], spec["num_key_value_heads"]
    Dh = spec["hidden_size"] // Hq
    dt = getattr(torch, args.dtype)
    rows = []
    for L in args.lengths:
        g = torch.Generator(device=args.device).manual_seed(0)
        q = torch.randn(1, Hq, L, Dh, device=args.device, dtype=dt, generator=g)
        k = torch.randn(1, Hkv, L, Dh, device=args.device, dtype=dt, generator=g)
        v = torch.randn(1, Hkv, L, Dh, device=args.device, dtype=dt, generator=g)
        methods = _layer_methods(q, k, v, args.device)
        for name, fn in methods.items():
            with torch.no_grad():
                fn()
                times = []
                for _ in range(args.repeats):
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            rows.append(dict(device=args.device, method=name, L=L, Hq=Hq, Hkv=Hkv, Dh=Dh, dtype=args.dtype,
                             seconds=round(min(times), 4), seconds_median=round(statistics.median(times), 4),
                             vs_sdpa="", threads=args.threads))
            print(f"layer {name:9s} L={L:6d}: {rows[-1]['seconds']} s", flush=True)
        sd = rows[-len(methods)]["seconds"]
        for r in rows[-len(methods):]:
            r["vs_sdpa"] = round(r["seconds"] / sd, 3)
    return rows


# --------------------------------------------------------------------------- part 4: packed vs padded scoring


def _mixed_records(n: int, row: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` records of uniform random length in [32, min(1024, row)] tokens (EOS included)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(32, min(1024, row))
        out += _records(1, L, vocab, seed=rng.randrange(2**31))
    return out


def _child_packed(args: argparse.Namespace) -> None:
    """One layout of part 4 in this (fresh) process: prints seconds, peak and the packing counts."""
    import torch

    from xtf_kernels.xtf import score_dataset

    torch.set_num_threads(args.threads)
    spec = GPU_MODEL if args.device == "cuda" else CPU_MODEL
    model = _model(spec, args.row, args.device, args.dtype, "sdpa")
    tok = _tokenizer(spec["vocab_size"])
    records = _mixed_records(args.score_docs, args.row, spec["vocab_size"])
    pack = args.child_packed == "packed"
    batch = args.pack_rows if pack else args.pad_batch

    def once(recs) -> dict:
        with tempfile.TemporaryDirectory() as d:
            return score_dataset(model, recs, d, tokenizer=tok, batch_size=batch, max_length=args.row,
                                 device=args.device, progress=False, pack=pack, shard_size=max(256, len(recs)))

    once(_mixed_records(2, 64, spec["vocab_size"], seed=1))  # warm-up (and a first native build)
    times, summary = [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        summary = once(records)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    if pack:
        positions = summary["packing"]["positions_packed"]
    else:  # right-padded batches of `batch` records in data order (each record is exactly its length)
        n = [len(_ids([r], tok, "cpu")[0]) for r in records]
        positions = sum(len(n[i : i + batch]) * max(n[i : i + batch]) for i in range(0, len(n), batch))
    tokens = summary["tokens"]["total"]
    print(json.dumps({"seconds": min(times), "seconds_median": statistics.median(times), "peak_mb": peak,
                      "batch": batch, "tokens": tokens, "positions": positions,
                      "padding_share": 1 - tokens / positions}))


def run_packed_scoring(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for layout in ("padded", "packed"):
        cmd = [sys.executable, "-m", "benchmarks.score_throughput", "--child-packed", layout, "--score-docs",
               str(args.score_docs), "--row", str(args.row), "--pad-batch", str(args.pad_batch), "--pack-rows",
               str(args.pack_rows), "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
               "--repeats", str(args.repeats)]
        row = dict(device=args.device, layout=layout, documents=args.score_docs, row=args.row, threads=args.threads,
                   status="ok", note="")
        out, failure = run_child(cmd, args.timeout)
        if failure is not None:
            rows.append({**row, **failure})
            continue
        row.update(seconds=round(out["seconds"], 3), seconds_median=round(out["seconds_median"], 3),
                   peak_mb=round(out["peak_mb"]), batch=out["batch"], real_tokens=out["tokens"],
                   tokens_per_s=round(out["tokens"] / out["seconds"]))
        row.update(positions=out["positions"], padding_share=round(out["padding_share"], 4))
        rows.append(row)
        print(f"scoring {layout:6s}: {row['status']} {row.get('seconds')} s, peak {row.get('peak_mb')} MB", flush=True)
    if len(rows) == 2 and all(r["status"] == "ok" for r in rows):
        pad, pk = rows
        pk["vs_padded"] = round(pk["seconds"] / pad["seconds"], 3)
        pad["vs_padded"] = 1.0
        target = 1 - pad["padding_share"] / 2
        pk["note"] = (f"target: <= {target:.3f} x padded (half the padding share); "
                      f"{'met' if pk['vs_padded'] <= target else 'NOT met'}")
    return rows


def _plot_packed(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar([r["layout"] for r in ok], [r["seconds"] for r in ok], color=["tab:gray", "tab:green"][: len(ok)])
    for j, r in enumerate(ok):
        ax.annotate(f"{r.get('vs_padded', '')}x\n{r.get('positions', '?')} positions", (j, r["seconds"]),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("seconds (fastest repeat)")
    ax.set_title(f"score_dataset, {args.score_docs} records of 32-1024 tokens, rows of {args.row}\n"
                 f"({args.device}, {args.threads} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- output


def _table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(w[c]) for c in cols), "-+-".join("-" * w[c] for c in cols)]
    lines += [" | ".join(str(r.get(c, "")).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _plot(score_rows: list[dict], mixed_rows: list[dict], layer_rows: list[dict], path: Path,
          args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    lengths = sorted({r["L"] for r in score_rows})
    width = 0.27
    for i, method in enumerate(METHODS):
        xs, ys = [], []
        for j, L in enumerate(lengths):
            r = next((r for r in score_rows if r["method"] == method and r["L"] == L), None)
            if r is None:
                continue
            if r["status"] == "ok":
                xs.append(j + (i - 1) * width)
                ys.append(r["seconds"])
                ax.annotate(f"{r['peak_mb']} MB", (xs[-1], ys[-1]), ha="center", va="bottom", fontsize=6)
            else:
                ax.annotate(f"{method}: {r['status']}", (j + (i - 1) * width, 0.02), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=7, rotation=90)
        if xs:
            ax.bar(xs, ys, width, label=method)
    ax.set_xticks(range(len(lengths)), [f"L={L}\n({next(r['examples'] for r in score_rows if r['L'] == L)} ex.)"
                                        for L in lengths])
    ax.set_ylabel("seconds (fastest repeat)")
    ax.set_title(f"scoring, random Llama ({args.device}, {args.threads} threads)", fontsize=9)
    if any(r["status"] == "ok" for r in score_rows):
        ax.legend(fontsize=8)
    ax = axes[1]
    if mixed_rows:
        ax.bar([r["layout"] for r in mixed_rows], [r["seconds"] for r in mixed_rows],
               color=["tab:gray", "tab:green", "tab:red"])
        for j, r in enumerate(mixed_rows):
            ax.annotate(f"{r['vs_padded']}x\n{r['slots']} slots", (j, r["seconds"]), ha="center", va="bottom",
                        fontsize=7)
        ax.margins(y=0.15)
        ax.set_title(f"attention + received, {mixed_rows[0]['documents']} docs of 32-1024 tokens "
                     f"(padding share {mixed_rows[0]['padding_share']:.0%})", fontsize=9)
        ax.set_ylabel("seconds (fastest repeat)")
    else:
        ax.axis("off")
    ax = axes[2]
    for method in dict.fromkeys(r["method"] for r in layer_rows):
        pts = [(r["L"], r["seconds"]) for r in layer_rows if r["method"] == method]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    if layer_rows:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_ylabel("seconds per layer")
        ax.set_title("one attention layer: output (+ received)", fontsize=9)
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="default 1024 4096 16384 (CUDA: 4096 16384 32768)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens scored per length (examples = tokens // L, >= 1)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward (batch = this // L, >= 1)")
    ap.add_argument("--head-chunk", type=int, default=1024, help="rows per LM-head GEMM in the floor")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--max-naive-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    ap.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                    help="part 2: packed vs padded attention (default on)")
    ap.add_argument("--scoring", action=argparse.BooleanOptionalAction, default=True, help="part 1 (default on)")
    ap.add_argument("--layer", action=argparse.BooleanOptionalAction, default=True,
                    help="part 3: one attention layer (default on)")
    ap.add_argument("--docs", type=int, default=64, help="documents in part 2")
    ap.add_argument("--row", type=int, default=2048, help="packed row length in part 2")
    ap.add_argument("--pad-batch", type=int, default=4, help="documents per padded batch in part 2")
    ap.add_argument("--packed-scoring", action=argparse.BooleanOptionalAction, default=True,
                    help="part 4: score_dataset packed vs padded on mixed lengths (default on)")
    ap.add_argument("--score-docs", type=int, default=24, help="records scored in part 4")
    ap.add_argument("--pack-rows", type=int, default=1, help="packed rows per forward in part 4")
    ap.add_argument("--child-packed", choices=["padded", "packed"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.lengths is None:
        args.lengths = [4096, 16384, 32768] if args.device == "cuda" else [1024, 4096, 16384]
    if args.child:
        args.L = args.lengths[0]
        _child(args)
        return
    if args.child_packed:
        _child_packed(args)
        return
    for name in ("tokens", "batch_tokens", "head_chunk", "repeats", "threads", "docs", "row", "pad_batch",
                 "score_docs", "pack_rows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if any(L < 2 for L in args.lengths):
        raise SystemExit(f"--lengths: expected ints >= 2, got {args.lengths}")
    print(f"device {args.device} ({platform.processor() or platform.machine()}), threads {args.threads}, "
          f"load average {_load_avg()}", flush=True)
    stem = args.out / f"score_throughput_{args.device}"
    score_rows = run_scoring(args) if args.scoring else []
    if score_rows:
        _write_csv(stem.with_suffix(".csv"), FIELDS, score_rows)
        print(_table(score_rows, ["method", "L", "examples", "batch", "status", "seconds", "vs_floor", "cpu_seconds",
                                  "cpu_vs_floor", "peak_mb", "note"]))
    mixed_rows = run_mixed(args) if args.mixed else []
    if mixed_rows:
        _write_csv(args.out / f"score_throughput_mixed_{args.device}.csv", MIXED_FIELDS, mixed_rows)
        print(_table(mixed_rows, ["layout", "rows", "slots", "padding_share", "seconds", "vs_padded", "note"]))
    layer_rows = run_layer(args) if args.layer else []
    if layer_rows:
        _write_csv(args.out / f"score_throughput_layer_{args.device}.csv", LAYER_FIELDS, layer_rows)
        print(_table(layer_rows, ["method", "L", "seconds", "seconds_median", "vs_sdpa"]))
    packed_rows = run_packed_scoring(args) if args.packed_scoring else []
    if packed_rows:
        _write_csv(args.out / f"score_throughput_packed_{args.device}.csv", PACKED_FIELDS, packed_rows)
        print(_table(packed_rows, ["layout", "batch", "real_tokens", "positions", "padding_share", "seconds",
                                   "vs_padded", "peak_mb", "note"]))
        _plot_packed(packed_rows, args.out / f"score_throughput_packed_{args.device}.png", args)
    if score_rows or mixed_rows or layer_rows:
        _plot(score_rows, mixed_rows, layer_rows, stem.with_suffix(".png"), args)
        print(f"wrote {stem}.csv / .png under {args.out}")


if __name__ == "__main__":
    main()
