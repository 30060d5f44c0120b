"""``score_dataset``: the two-pass XTF scoring pipeline (single process or torch.distributed).

Pass 1 (model forward, per shard of ``shard_size`` examples): attention received (RI), the
fused masked-CE statistics on the final hidden states (KN = 1 - p, log-prob, entropy; the
reference model's log-probs when given), written to ``out/pass1/shard-XXXXX.parquet``.
Between the passes the dataset-global parts are reduced across ranks: the response-token
histogram over the vocabulary (-> domain vector, S_TR per token id, min/max) and the fixed-bin
[0, 1] histogram of S_TR (-> Multi-Otsu thresholds). Pass 2 adds S_TR, applies the rules and
writes ``out/tokens/shard-XXXXX.parquet``; ``summary.json`` holds the reduced counts.

Shard ``s`` holds examples ``[s * shard_size, (s + 1) * shard_size)`` and is scored by rank
``s % world_size``, so the files do not depend on the number of ranks, and a shard present
with the run's fingerprint is skipped (resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import rundir
from . import shards as sh
from .contextual import HIDDEN_SUM_KEY, ContextualTR, encode_meta, hidden_sum_meta
from .data import Example, tokenize_records
from .multiotsu import bin_edges, fixed_histogram, multiotsu_from_histogram
from .rules import RuleConfig, apply_rules, overlap_counts, ri_fence_mask, type_diagnostics
from .runtime import check_device_available, hf_progress, prepare_backend
from .scorers import (
    HiddenCapture,
    TaskRelevance,
    decoder_hidden,
    knowledge_novelty,
    reasoning_importance,
    resolve_ri_fn,
)
from .summary import PAPER, build_summary, count_types, with_readings

__all__ = ["score_dataset", "load_model_and_tokenizer", "PAPER"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    check_device_available(dev)
    return dev


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected 'auto', 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    return _DTYPES[dtype]


def load_model_and_tokenizer(
    model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    progress: bool = True,
):
    """Load a local Hugging Face causal-LM checkpoint and its tokenizer (nothing is downloaded).

    ``progress=False`` hides the checkpoint-loading bar.

    Raises:
        FileNotFoundError: no such directory / no config.json.
        ValueError: no tokenizer in the directory, or no LM head in the checkpoint.
    """
    import transformers

    p = Path(model_dir)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"model: {p} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ValueError(f"model: no usable tokenizer in {p} ({type(e).__name__}: {e})") from e
    try:
        with hf_progress(progress):
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(p), dtype=dtype, local_files_only=True, output_loading_info=True
            )
    except ValueError as e:
        raise ValueError(f"model: {p} cannot be loaded as a causal LM ({e})") from e
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    missing = [k for k in info.get("missing_keys", []) if "lm_head" in k or "output" in k.split(".")[0]]
    if head is None or (missing and not tied):
        raise ValueError(
            f"model: the checkpoint in {p} has no LM head weights ({missing or 'no output embeddings'}); "
            "XTF needs the *ForCausalLM checkpoint that will be fine-tuned"
        )
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray([e.example_id, e.n_prompt, len(e.input_ids)], dtype=np.int64).tobytes())
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def _pad(batch: Sequence[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, : len(e.input_ids)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _score_shard(
    model, ref_model, examples: Sequence[Example], *, batch_size: int, pad_id: int, device: torch.device,
    ri_fn, ri_layers, ri_reduce: str, backend: str, pbar, hidden_sum: list | None = None,
) -> pa.Table:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "example_id", "position", "token_id", "is_response", "ri", "kn", "logprob", "entropy", "ref_logprob")}
    cap = HiddenCapture(model)
    try:
        for s in range(0, len(examples), batch_size):
            batch = examples[s : s + batch_size]
            ids, mask = _pad(batch, pad_id, device)
            cap.value = None
            ri = reasoning_importance(model, ids, mask, layers=ri_layers, reduce=ri_reduce, ri_fn=ri_fn)
            hidden = cap.value
            if hidden is None or tuple(hidden.shape[:2]) != tuple(ids.shape):
                hidden = decoder_hidden(model, ids, mask)
            ref_lp = None
            if ref_model is not None:
                ref_lp = knowledge_novelty(ref_model, ids, mask, backend=backend)["logprob"]
            kn = knowledge_novelty(model, ids, mask, hidden=hidden, ref_logprobs=ref_lp, backend=backend)
            if hidden_sum is not None:  # contextual TR: the shard's sum of response hidden states
                resp = torch.zeros(ids.shape, dtype=torch.bool)
                for b, e in enumerate(batch):
                    resp[b, e.n_prompt : len(e.input_ids)] = True
                hs, hn = hidden_sum_meta(hidden, resp)
                hidden_sum[0] = hs if hidden_sum[0] is None else hidden_sum[0] + hs
                hidden_sum[1] += hn
            ri_np = ri.cpu().numpy()
            kn_np = {k: v.cpu().numpy() for k, v in kn.items()}
            ref_np = None if ref_lp is None else ref_lp.float().cpu().numpy()
            for b, e in enumerate(batch):
                n = len(e.input_ids)
                cols["example_id"].append(np.full(n, e.example_id, dtype=np.int64))
                cols["position"].append(np.arange(n, dtype=np.int32))
                cols["token_id"].append(np.asarray(e.input_ids, dtype=np.int32))
                cols["is_response"].append(np.arange(n) >= e.n_prompt)
                cols["ri"].append(ri_np[b, :n].astype(np.float32))
                cols["kn"].append(kn_np["kn"][b, :n].astype(np.float32))
                cols["logprob"].append(kn_np["logprob"][b, :n].astype(np.float32))
                cols["entropy"].append(kn_np["entropy"][b, :n].astype(np.float32))
                cols["ref_logprob"].append(
                    np.full(n, np.nan, np.float32) if ref_np is None else ref_np[b, :n].astype(np.float32))
            if pbar is not None:
                pbar.update(int(mask.sum()))
    finally:
        cap.close()
    if ref_model is None:
        del cols["ref_logprob"]
    return pa.table({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})


def _token_texts(tokenizer, ids: np.ndarray, cache: dict[int, str]) -> list[str]:
    out = []
    for t in ids.tolist():
        s = cache.get(t)
        if s is None:
            s = tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            cache[t] = s
        out.append(s)
    return out


def score_dataset(
    model: str | os.PathLike | torch.nn.Module,
    data: str | os.PathLike | Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    rules: RuleConfig | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    shard_size: int = 256,
    on_error: str = "fail",
    truncation: str = "right",
    add_eos: bool = True,
    ri_layers: Sequence[int] | None = None,
    ri_reduce: str = "mean_over_queries",
    tr_metric: str = "cosine",
    domain_words: Sequence[str] | None = None,
    ref_model: str | os.PathLike | torch.nn.Module | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    ri_fn=None,
    backend: str = "auto",
    tr_source: str | None = None,
    ri_aggregation: str | None = None,
    protect: Sequence[int] | None = None,
) -> dict:
    """Score every response token of a dataset with XTF and write the per-token records.

    Args:
        model: local checkpoint directory (model + tokenizer) or a loaded causal LM (then pass
            ``tokenizer``).
        data: JSONL path (``prompt``/``response`` or chat ``messages``), a file/directory that
            ``datasets`` loads, or an iterable of such dicts.
        out_dir: output directory (``pass1/``, ``tokens/``, ``config.json``, ``summary.json``).
        tokenizer: tokenizer when ``model`` is a module.
        rules: :class:`RuleConfig` (RI fence k=1.0, KN < 0.05, TR Multi-Otsu 3 classes).
        batch_size: sequences per forward (right-padded).
        max_length: context limit (default: the model's ``max_position_embeddings``).
        dtype: ``"auto"`` (bf16 on a GPU with bf16, else fp32), ``"bf16"``, ``"fp16"``, ``"fp32"``.
        device: ``"auto"`` (``cuda:$LOCAL_RANK`` if available, else CPU), ``"cpu"``, ``"cuda:N"``.
        shard_size: examples per Parquet shard (the unit of resume and of distribution).
        on_error: bad record -> ``"fail"`` (message with the line number) or ``"skip"`` (counted).
        truncation: sequence longer than ``max_length`` -> ``"right"`` (truncate, counted),
            ``"skip"`` (counted) or ``"fail"``.
        add_eos: append EOS to prompt/response responses.
        ri_layers, ri_reduce: attention-received options (layer subset; aggregation).
        tr_metric: ``"cosine"`` or ``"euclidean"`` distance to the domain vector.
        domain_words: optional words whose embedding rows define the domain vector.
        ref_model: optional reference model (directory or module, same tokenizer) whose
            log-probs are stored as ``ref_logprob`` for the SLM / Token Cleaning baselines.
        resume: skip shards already written by a run with the same fingerprint (temp files
            of killed writers are removed, see :mod:`.rundir`).
        overwrite: delete the results of a run with different settings in ``out_dir`` (only
            the files xtf wrote, the default ``report/`` included; other files are kept).
        progress: the checkpoint-loading and tokens/s bars, and resume notes, on rank 0.
        ri_fn: override of ``collect_received_attention`` (same signature).
        backend: masked_ce backend.
        tr_source, ri_aggregation, protect: the readings (override the fields of ``rules``):
            TR from the ``"input"`` embedding row (default) or the ``"contextual"`` final hidden
            state; RI ``"mean"`` over visible queries (default) or ``"debiased"`` against
            uniform causal attention; token ids never masked. All enter the fingerprint.

    Returns:
        The summary dict (also written to ``out_dir/summary.json`` by rank 0), plus ``"run"``
        (not written): this call's ``shards``, ``reused_pass1`` / ``reused_tokens`` (shards
        kept from an earlier run), ``tokens_scored`` and ``seconds`` (pass 1, backend build
        excluded).

    Raises:
        NotADirectoryError, PermissionError, OSError: ``out_dir`` cannot be written.
        rundir.RunExistsError: ``out_dir`` holds another run (or resume is off).
        ValueError: bad arguments or data (:class:`~xtf_kernels.xtf.XTFDataError`), an
            unavailable ``device``.
    """
    rank, world = sh.dist_info()
    cfg_rules = rules or RuleConfig()
    if not isinstance(cfg_rules, RuleConfig):
        raise TypeError(f"rules: expected a RuleConfig, got {type(rules).__name__}")
    cfg_rules = with_readings(cfg_rules, tr_source, ri_aggregation, protect)
    if cfg_rules.ri_aggregation == "debiased":
        if ri_reduce != "mean_over_queries":
            raise ValueError(f"ri_reduce: ri_aggregation='debiased' replaces it; got ri_reduce={ri_reduce!r}")
        ri_reduce = "debiased"
    contextual = cfg_rules.tr_source == "contextual"
    if contextual and domain_words is not None:
        raise ValueError("domain_words: not supported with tr_source='contextual' (the domain vector is the mean hidden state)")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if tr_metric not in ("cosine", "euclidean"):
        raise ValueError(f"tr_metric: expected 'cosine' or 'euclidean', got {tr_metric!r}")
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    ri_fn = resolve_ri_fn(ri_fn)
    out = Path(out_dir)
    show = progress and rank == 0
    err = None
    try:  # before loading any model: a bad --out fails in seconds, on every rank
        rundir.check_writable_dir(out)
    except OSError as e:
        err = e
    sh.raise_if_any_rank_failed(err)
    rundir.remove_stale_tmp(out)  # left by killed writers of this machine

    if isinstance(model, (str, os.PathLike)):
        model_id = str(Path(model).resolve())
        model, tok = load_model_and_tokenizer(model, dtype=dt, device=dev, progress=show)
        tokenizer = tokenizer or tok
    elif isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("tokenizer: required when model is a loaded module")
        model_id = f"{type(model).__name__}:{getattr(model.config, '_name_or_path', '')}"
        model = model.to(dev).eval()
    else:
        raise TypeError(f"model: expected a checkpoint directory or a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ref_model, (str, os.PathLike)):
        ref_id = str(Path(ref_model).resolve())
        ref_model, _ = load_model_and_tokenizer(ref_model, dtype=dt, device=dev, progress=show)
    elif ref_model is None or isinstance(ref_model, torch.nn.Module):
        ref_id = None if ref_model is None else type(ref_model).__name__
        if ref_model is not None:
            ref_model = ref_model.to(dev).eval()
    else:
        raise TypeError(f"ref_model: expected None, a directory or a torch.nn.Module, got {type(ref_model).__name__}")

    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if max_length is None:
        if ctx <= 0:
            raise ValueError("max_length: the model config has no max_position_embeddings; pass max_length")
        max_length = ctx
    elif not isinstance(max_length, int) or max_length < 2 or (ctx and max_length > ctx):
        raise ValueError(f"max_length: expected an int in [2, {ctx or 'inf'}], got {max_length!r}")
    examples, tstats = tokenize_records(
        data, tokenizer, max_length=max_length, on_error=on_error, truncation=truncation, add_eos=add_eos
    )
    if not examples:
        raise ValueError(f"data: no usable examples ({tstats.records} records, skipped {tstats.skipped})")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    domain_ids = None
    if domain_words is not None:
        if isinstance(domain_words, str) or not all(isinstance(w, str) for w in domain_words):
            raise TypeError("domain_words: expected a sequence of str")
        domain_ids = sorted({t for w in domain_words for t in tokenizer(w, add_special_tokens=False)["input_ids"]})

    settings = {
        "model": model_id, "ref_model": ref_id, "rules": cfg_rules.to_dict(), "max_length": max_length,
        "dtype": str(dt).replace("torch.", ""), "shard_size": shard_size, "batch_size": batch_size,
        "truncation": truncation, "add_eos": add_eos, "on_error": on_error,
        "ri_layers": None if ri_layers is None else list(ri_layers), "ri_reduce": ri_reduce,
        "tr_metric": tr_metric, "domain_words": None if domain_words is None else list(domain_words),
        "examples_sha256": _examples_digest(examples),
    }
    fp = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    meta = {"xtf_fingerprint": fp}
    n_shards = (len(examples) + shard_size - 1) // shard_size
    mine = [s for s in range(n_shards) if s % world == rank]

    # output directory: never clobber a different run unless asked; keep the user's own files
    cfg_path = out / "config.json"
    run_start = None
    err = None
    if rank == 0:
        try:
            rundir.check_existing_run(out, fp, settings, resume=resume, overwrite=overwrite)
            sh.write_json_atomic({"fingerprint": fp, "settings": settings, "paper": PAPER}, cfg_path)
            run_start = cfg_path.stat().st_mtime
        except (OSError, ValueError) as e:
            err = e
    sh.raise_if_any_rank_failed(err)

    # ---- pass 1: model forward per shard
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    p1 = out / rundir.PASS1
    todo = [s for s in mine if not (resume and sh.shard_ok(p1 / f"shard-{s:05d}.parquet", meta))]
    reused = sh.all_reduce_sum(np.array([len(mine) - len(todo)], dtype=np.int64))
    if show and reused[0]:
        tqdm.write(f"xtf: resuming the run in {out}: pass 1 already done for {int(reused[0])} of {n_shards} shards")
    n_tok = sum(len(e.input_ids) for s in todo for e in examples[s * shard_size : (s + 1) * shard_size])
    if todo:
        prepare_backend(backend, dev, dt)  # a first-use native build happens here, not inside the timing
    t0 = time.perf_counter()
    pbar = tqdm(total=n_tok, unit="tok", unit_scale=True, desc="xtf pass 1" + (f" (rank {rank})" if world > 1 else ""),
                disable=not show or not todo, dynamic_ncols=True)
    try:
        for s in todo:
            shard_ex = examples[s * shard_size : (s + 1) * shard_size]
            hsum = [None, 0] if contextual else None
            tbl = _score_shard(model, ref_model, shard_ex, batch_size=batch_size, pad_id=pad_id, device=dev,
                               ri_fn=ri_fn, ri_layers=ri_layers, ri_reduce=ri_reduce, backend=backend, pbar=pbar,
                               hidden_sum=hsum)
            extra = {} if hsum is None else {HIDDEN_SUM_KEY: encode_meta(
                hsum[0] if hsum[0] is not None else np.zeros(0), hsum[1])}
            sh.write_table_atomic(tbl, p1 / f"shard-{s:05d}.parquet", {**meta, **extra})
    finally:
        pbar.close()
    elapsed = time.perf_counter() - t0
    sh.barrier()

    # ---- between the passes: dataset-global task relevance and Multi-Otsu thresholds
    trel = TaskRelevance(vocab, tr_metric)
    for s in mine:
        t = sh.read_shard(p1 / f"shard-{s:05d}.parquet", ["token_id", "is_response"])
        ids = t["token_id"].to_numpy()
        trel.add(ids[t["is_response"].to_numpy()])
    local_counts = trel.counts.copy()
    trel.counts = sh.all_reduce_sum(local_counts).astype(np.int64)
    tr_vocab = trel.finalize(model.get_input_embeddings().weight.detach(), domain_ids)
    tr_note, ctx = None, None
    if contextual:
        ctx = ContextualTR(out, n_shards, mine, tr_metric, cfg_rules.tr_nbins, cfg_rules.tr_classes)
        ctx.domain_vector(int(model.get_input_embeddings().weight.shape[1]))
        ctx.write_distances(model, lambda s: examples[s * shard_size : (s + 1) * shard_size], meta, resume=resume,
                            batch_size=batch_size, pad_id=pad_id, device=dev, pad_fn=_pad)
        sh.barrier()
        thresholds, tr_note = ctx.thresholds()
        trel.info = ctx.info
    else:
        present = local_counts > 0
        local_hist = fixed_histogram(tr_vocab[present], 0.0, 1.0, cfg_rules.tr_nbins, weights=local_counts[present])
        hist = sh.all_reduce_sum(np.rint(local_hist).astype(np.int64))
        try:
            thresholds = multiotsu_from_histogram(hist, bin_edges(0.0, 1.0, cfg_rules.tr_nbins), cfg_rules.tr_classes)
        except ValueError as e:
            thresholds, tr_note = None, f"TR rule off: {e}"
    meta2 = {**meta, "xtf_tr_thresholds": json.dumps(None if thresholds is None else [float(x) for x in thresholds])}

    # ---- pass 2: TR scores, rules, final shards
    p2 = out / rundir.TOKENS
    cache: dict[int, str] = {}
    n_reused2 = 0
    for s in mine:
        dst = p2 / f"shard-{s:05d}.parquet"
        if resume and sh.shard_ok(dst, meta2):
            n_reused2 += 1
            continue
        t = sh.read_shard(p1 / f"shard-{s:05d}.parquet")
        cols = {c: t[c].to_numpy() for c in t.column_names}
        tr = ctx.scores(s) if ctx is not None else tr_vocab[cols["token_id"].astype(np.int64)]
        cols["tr"] = np.where(cols["is_response"], tr, np.nan).astype(np.float32)
        reasons, keep = apply_rules(cols, cfg_rules, thresholds)
        _, fences = ri_fence_mask(cols["ri"], cols["example_id"], cols["is_response"], cfg_rules.ri_k)
        fence = np.array([fences.get(int(e), np.nan) for e in cols["example_id"]], dtype=np.float32)
        order = ["example_id", "position", "token_id"]
        data_cols = {c: cols[c] for c in order}
        data_cols["token_text"] = pa.array(_token_texts(tokenizer, cols["token_id"], cache), pa.string())
        data_cols["is_response"] = cols["is_response"]
        for c in ("ri", "kn", "tr", "logprob", "entropy", "ref_logprob"):
            if c in cols:
                data_cols[c] = cols[c].astype(np.float32)
        data_cols["ri_fence"] = fence
        data_cols["keep"] = keep
        data_cols["reasons"] = reasons.astype(np.uint8)
        sh.write_table_atomic(pa.table(data_cols), dst, meta2)
    sh.barrier()

    # ---- summary: counts reduced across ranks
    keys = [f"only:{b}" for b in range(8)]
    local = np.zeros(len(keys) + 3, dtype=np.int64)
    per_type = np.zeros((5, vocab), dtype=np.int64)  # occurrences, masked, RI, KN, TR per token id
    for s in mine:
        t = sh.read_shard(p2 / f"shard-{s:05d}.parquet", ["example_id", "token_id", "is_response", "reasons"])
        resp = t["is_response"].to_numpy()
        count_types(per_type, t["token_id"].to_numpy()[resp], t["reasons"].to_numpy()[resp])
        oc = overlap_counts(t["reasons"].to_numpy(), resp)
        local[: len(keys)] += np.array([oc[k] for k in keys], dtype=np.int64)
        local[len(keys)] += resp.size
        local[len(keys) + 1] += int((~resp).sum())
        local[len(keys) + 2] += len(np.unique(t["example_id"].to_numpy()))
    tot = sh.all_reduce_sum(local)
    reused2 = sh.all_reduce_sum(np.array([n_reused2], dtype=np.int64))
    tok_now = sh.all_reduce_sum(np.array([n_tok], dtype=np.int64))
    per_type = sh.all_reduce_sum(per_type)
    summary = build_summary(tot, keys, tstats, len(examples), cfg_rules, thresholds, tr_note, trel.info, fp, n_shards, settings)
    summary["diagnostics"] = type_diagnostics(
        per_type[0], per_type[1], {"RI": per_type[2], "KN": per_type[3], "TR": per_type[4]},
        lambda i: _token_texts(tokenizer, np.asarray([i]), cache)[0])
    if rank == 0:
        sh.write_json_atomic(summary, out / "summary.json")
        if show and n_tok:
            tqdm.write(f"xtf: scored {n_tok} tokens in {elapsed:.1f}s ({n_tok / max(elapsed, 1e-9):.0f} tokens/s) -> {out}")
    sh.barrier()
    if rank == 0:  # every rank is past its last write: older temp files belong to no live writer of this run
        rundir.remove_stale_tmp(out, older_than=run_start)
    run = {"shards": n_shards, "reused_pass1": int(reused[0]), "reused_tokens": int(reused2[0]),
           "tokens_scored": int(tok_now[0]), "seconds": elapsed}
    return {**summary, "run": run}

