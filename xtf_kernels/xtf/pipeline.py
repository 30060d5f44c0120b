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

Each phase lives in its own module of :mod:`xtf_kernels.xtf.scoring` (prepare, pass1, reduce,
pass2, totals); :func:`score_dataset` calls them in order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from . import shards as sh
from .rules import RuleConfig
from .runtime import prepare_backend
from .scoring.models import load_model_and_tokenizer
from .scoring.models import resolve_device as _resolve_device  # noqa: F401  (kept importable from here)
from .scoring.models import resolve_dtype as _resolve_dtype  # noqa: F401
from .scoring.pass1 import pending_pass1, run_pass1
from .scoring.pass2 import TokenTexts, run_pass2
from .scoring.prepare import ScoreOptions, prepare_run
from .scoring.reduce import reduce_between_passes
from .scoring.totals import write_summary
from .summary import PAPER

__all__ = ["score_dataset", "load_model_and_tokenizer", "PAPER"]


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
    pack: bool = False,
    preset: str | None = None,
    chat_template: bool = False,
) -> dict:
    """Score every response token of a dataset with XTF and write the per-token records.

    Args:
        model: local checkpoint directory (model + tokenizer) or a loaded causal LM (then pass
            ``tokenizer``).
        data: JSONL path (``prompt``/``response`` or chat ``messages``), a file/directory that
            ``datasets`` loads, or an iterable of such dicts.
        out_dir: output directory (``pass1/``, ``tokens/``, ``config.json``, ``summary.json``).
        tokenizer: tokenizer when ``model`` is a module.
        rules: :class:`RuleConfig` (default: the ``official`` preset, the released
            implementation's capped rules; ``RuleConfig(preset="paper")`` for the paper's text).
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
            TR from the token run alone (``"isolated"``, official default), the ``"input"``
            embedding row (paper default) or the ``"contextual"`` final hidden state (paper);
            RI ``"mean"`` over visible queries (default) or ``"debiased"`` against uniform
            causal attention; token ids never masked. All enter the fingerprint.
        pack: score rows packed with whole examples (rows of up to ``max_length`` tokens,
            ``batch_size`` rows per forward; :mod:`.scoring.pass1_packed`): the records of an
            unpacked run; ``summary["packing"]`` reports the padding saved and the tokens within
            1e-5 of a threshold; enters the fingerprint. Refused for a model whose attention
            does not honour packed ``position_ids``.
        preset: ``"official"`` or ``"paper"``: shorthand for ``rules=RuleConfig(preset=...)``
            (refused when it contradicts ``rules.preset``). Under ``official`` the TR domain
            words default to the 16 most frequent response words (recorded in the summary).
        chat_template: render ``prompt``/``response`` records with the tokenizer's chat template
            (a user turn, then the assistant turn); by default they are joined as they are (the
            prompt's tokens, the response's, EOS: no separator, no template, as TRL does for
            non-conversational data). ``ValueError`` if the tokenizer has no chat template.

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
    opts = ScoreOptions(
        rules=rules, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
        shard_size=shard_size, on_error=on_error, truncation=truncation, add_eos=add_eos, ri_layers=ri_layers,
        ri_reduce=ri_reduce, tr_metric=tr_metric, domain_words=domain_words, resume=resume, overwrite=overwrite,
        progress=progress, ri_fn=ri_fn, backend=backend, tr_source=tr_source, ri_aggregation=ri_aggregation,
        protect=protect, pack=pack, preset=preset, chat_template=chat_template,
    )
    run = prepare_run(model, data, out_dir, opts, tokenizer=tokenizer, ref_model=ref_model)
    todo, reused, n_tok = pending_pass1(run)
    if todo:
        prepare_backend(backend, run.device, run.dtype)  # a first-use native build happens here, not inside the timing
    elapsed = run_pass1(run, todo, n_tok)
    between = reduce_between_passes(run)
    texts = TokenTexts(run.tokenizer)
    n_reused2 = run_pass2(run, between, texts)
    summary = write_summary(run, between, texts, n_tok, elapsed)
    reused2, tok_now = sh.all_reduce_sum(np.array([n_reused2, n_tok], dtype=np.int64))
    run_info = {"shards": run.n_shards, "reused_pass1": reused, "reused_tokens": int(reused2),
                "tokens_scored": int(tok_now), "seconds": elapsed}
    if run.rules_changed is not None:  # rank 0: only rule parameters changed, pass 1 was reused
        run_info["rules_changed"] = list(run.rules_changed)
    return {**summary, "run": run_info}
