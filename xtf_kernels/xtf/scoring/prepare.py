"""Before pass 1: arguments, models, examples, the run's fingerprint and its output directory.

:func:`prepare_run` returns the :class:`ScoreRun` that every later phase reads. Errors come
in the order a user can fix them fastest: bad arguments, then an unwritable ``out_dir`` (on
every rank, before any model is loaded), then the model and the data, then a clash with
another run in ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import rundir
from .. import shards as sh
from ..data import Example, TokenizeStats, tokenize_records
from ..rules import PRESETS, RuleConfig
from ..scorers import resolve_ri_fn
from ..summary import PAPER, with_readings
from .models import load_models, resolve_device, resolve_dtype
from .pass1_packed import PackedScoring

__all__ = ["ScoreOptions", "ScoreRun", "prepare_run"]


@dataclass(frozen=True)
class ScoreOptions:
    """The keyword arguments of ``score_dataset`` (see its docstring), unchecked."""

    rules: RuleConfig | None
    batch_size: int
    max_length: int | None
    dtype: str | torch.dtype
    device: str | torch.device
    shard_size: int
    on_error: str
    truncation: str
    add_eos: bool
    ri_layers: Sequence[int] | None
    ri_reduce: str
    tr_metric: str
    domain_words: Sequence[str] | None
    resume: bool
    overwrite: bool
    progress: bool
    ri_fn: Any
    backend: str
    tr_source: str | None
    ri_aggregation: str | None
    protect: Sequence[int] | None
    pack: bool = False
    preset: str | None = None
    chat_template: bool = False


@dataclass
class ScoreRun:
    """One rank's view of a scoring run: checked options, models, examples, shards."""

    opts: ScoreOptions
    rules: RuleConfig
    ri_reduce: str
    ri_fn: Any
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    out: Path
    model: Any = None
    ref_model: Any = None
    tokenizer: Any = None
    examples: list[Example] = field(default_factory=list)
    tstats: TokenizeStats | None = None
    vocab: int = 0
    domain_ids: list[int] | None = None
    settings: dict = field(default_factory=dict)
    fingerprint: str = ""
    #: fingerprint of what pass 1 depends on (a run changing only rule parameters reuses pass 1)
    pass1_fingerprint: str = ""
    #: the rule settings that changed from the run found in out_dir when pass 1 is reused
    rules_changed: tuple[str, ...] | None = None
    n_shards: int = 0
    mine: list[int] = field(default_factory=list)
    run_start: float | None = None
    #: packed scoring (:class:`~xtf_kernels.xtf.scoring.pass1_packed.PackedScoring`) or None
    packed: Any = None

    @property
    def show(self) -> bool:
        """Progress bars and notes: asked for, and rank 0."""
        return self.opts.progress and self.rank == 0

    @property
    def contextual(self) -> bool:
        return self.rules.tr_source == "contextual"

    @property
    def meta(self) -> dict[str, str]:
        """Metadata of the pass-1 (and contextual-distance) shards: the pass-1 fingerprint (resume check)."""
        return {"xtf_pass1": self.pass1_fingerprint}

    @property
    def final_meta(self) -> dict[str, str]:
        """Metadata of the final shards: the run's full fingerprint."""
        return {"xtf_fingerprint": self.fingerprint}

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def shard_examples(self, s: int) -> list[Example]:
        size = self.opts.shard_size
        return self.examples[s * size : (s + 1) * size]

    def shard_path(self, phase_dir: str, s: int) -> Path:
        return self.out / phase_dir / f"shard-{s:05d}.parquet"


def _check_options(opts: ScoreOptions, out_dir: Any) -> ScoreRun:
    rank, world = sh.dist_info()
    if opts.preset is not None and opts.preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {opts.preset!r}")
    cfg = opts.rules or RuleConfig(preset=opts.preset or "official")
    if not isinstance(cfg, RuleConfig):
        raise TypeError(f"rules: expected a RuleConfig, got {type(opts.rules).__name__}")
    if opts.preset is not None and cfg.preset != opts.preset:
        raise ValueError(f"preset: {opts.preset!r} contradicts rules.preset={cfg.preset!r} (give one of them)")
    cfg = with_readings(cfg, opts.tr_source, opts.ri_aggregation, opts.protect)
    if cfg.official and cfg.ri_source == "received" and opts.ri_layers is None:
        opts = dataclasses.replace(opts, ri_layers=[0])  # the released computation reads layer 0
    ri_reduce = opts.ri_reduce
    if cfg.ri_aggregation == "debiased":
        if ri_reduce != "mean_over_queries":
            raise ValueError(f"ri_reduce: ri_aggregation='debiased' replaces it; got ri_reduce={ri_reduce!r}")
        ri_reduce = "debiased"
    if cfg.tr_source == "contextual" and opts.domain_words is not None:
        raise ValueError("domain_words: not supported with tr_source='contextual' (the domain vector is the mean hidden state)")
    for name, v in (("batch_size", opts.batch_size), ("shard_size", opts.shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not isinstance(opts.pack, bool):
        raise TypeError(f"pack: expected a bool, got {type(opts.pack).__name__}")
    if opts.tr_metric not in ("cosine", "euclidean"):
        raise ValueError(f"tr_metric: expected 'cosine' or 'euclidean', got {opts.tr_metric!r}")
    dev = resolve_device(opts.device)
    ri_fn = no_attention_ri if cfg.ri_source == "released" else resolve_ri_fn(opts.ri_fn)
    return ScoreRun(opts=opts, rules=cfg, ri_reduce=ri_reduce, ri_fn=ri_fn, device=dev,
                    dtype=resolve_dtype(opts.dtype, dev), rank=rank, world=world, out=Path(out_dir))


def no_attention_ri(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
    """RI as released (``ri_source="released"``): layer 0's attention averaged over the key axis
    is ``1 / L`` at every position (softmax rows sum to 1), a constant that flags nothing; no
    attention pass is run and the ``ri`` column is NaN."""
    return torch.full(tuple(input_ids.shape), float("nan"), dtype=torch.float32, device=input_ids.device)


def _check_output(run: ScoreRun) -> None:
    err = None
    try:  # before loading any model: a bad --out fails in seconds, on every rank
        rundir.check_writable_dir(run.out)
    except OSError as e:
        err = e
    sh.raise_if_any_rank_failed(err)
    rundir.remove_stale_tmp(run.out)  # left by killed writers of this machine


def _load_examples(run: ScoreRun, data: Any) -> int:
    """Tokenise ``data`` into ``run.examples``; returns the max_length used."""
    opts, model, tokenizer = run.opts, run.model, run.tokenizer
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    max_length = opts.max_length
    if max_length is None:
        if ctx <= 0:
            raise ValueError("max_length: the model config has no max_position_embeddings; pass max_length")
        max_length = ctx
    elif not isinstance(max_length, int) or max_length < 2 or (ctx and max_length > ctx):
        raise ValueError(f"max_length: expected an int in [2, {ctx or 'inf'}], got {max_length!r}")
    run.examples, run.tstats = tokenize_records(
        data, tokenizer, max_length=max_length, on_error=opts.on_error, truncation=opts.truncation,
        add_eos=opts.add_eos, chat_template=opts.chat_template,
    )
    if not run.examples:
        raise ValueError(f"data: no usable examples ({run.tstats.records} records, skipped {run.tstats.skipped})")
    first, special = run.examples[0], set(getattr(tokenizer, "all_special_ids", ()) or ())
    if all(t in special for t in first.input_ids):
        raise ValueError(
            f"tokenizer: it encodes the first record (example {first.example_id}) to special tokens only "
            f"({len(first.input_ids)}: {first.input_ids[:8]}); it is not this model's tokenizer"
        )
    run.vocab = int(model.get_input_embeddings().weight.shape[0])
    words = opts.domain_words
    if words is not None:
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise TypeError("domain_words: expected a sequence of str")
        run.domain_ids = sorted({t for w in words for t in tokenizer(w, add_special_tokens=False)["input_ids"]})
    return max_length


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray([e.example_id, e.n_prompt, len(e.input_ids)], dtype=np.int64).tobytes())
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def _fix_settings(run: ScoreRun, model_id: str, ref_id: str | None, max_length: int) -> None:
    """The settings that enter the fingerprint (a different fingerprint = a different run)."""
    o, r = run.opts, run.rules
    pass1 = {
        "model": model_id, "ref_model": ref_id, "max_length": max_length,
        "dtype": str(run.dtype).replace("torch.", ""), "shard_size": o.shard_size, "batch_size": o.batch_size,
        "truncation": o.truncation, "add_eos": o.add_eos, "on_error": o.on_error,
        "ri_layers": None if o.ri_layers is None else list(o.ri_layers), "ri_reduce": run.ri_reduce,
        "ri_source": r.ri_source, "examples_sha256": _examples_digest(run.examples),
    }
    if r.tr_source == "contextual":  # pass 1 stores the hidden-state sums; the distances use the metric
        pass1["tr_source"], pass1["tr_metric"] = r.tr_source, o.tr_metric
    if o.pack:  # only when on
        pass1["pack"] = True
    if o.chat_template:  # likewise (it changes the tokens)
        pass1["chat_template"] = True
    run.settings = {**pass1, "preset": r.preset, "rules": r.to_dict(), "tr_metric": o.tr_metric,
                    "domain_words": None if o.domain_words is None else list(o.domain_words)}
    run.pass1_fingerprint = hashlib.sha256(json.dumps(pass1, sort_keys=True).encode()).hexdigest()[:16]
    run.fingerprint = hashlib.sha256(json.dumps(run.settings, sort_keys=True).encode()).hexdigest()[:16]
    run.n_shards = (len(run.examples) + o.shard_size - 1) // o.shard_size
    run.mine = [s for s in range(run.n_shards) if s % run.world == run.rank]


def _old_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _claim_output(run: ScoreRun) -> None:
    """Never clobber a different run unless asked; keep the user's own files; write config.json."""
    cfg_path = run.out / "config.json"
    err = None
    if run.rank == 0:
        try:
            old = _old_config(cfg_path)
            removed = rundir.check_existing_run(run.out, run.fingerprint, run.settings, resume=run.opts.resume,
                                                overwrite=run.opts.overwrite, pass1_fingerprint=run.pass1_fingerprint)
            if removed and not run.opts.overwrite:
                run.rules_changed = rundir.changed_settings(old.get("settings") or {}, run.settings)
            sh.write_json_atomic({"fingerprint": run.fingerprint, "pass1_fingerprint": run.pass1_fingerprint,
                                  "settings": run.settings, "paper": PAPER}, cfg_path)
            run.run_start = cfg_path.stat().st_mtime
        except (OSError, ValueError) as e:
            err = e
    sh.raise_if_any_rank_failed(err)


def prepare_run(model: Any, data: Any, out_dir: Any, opts: ScoreOptions, *, tokenizer: Any, ref_model: Any) -> ScoreRun:
    """Check, load and tokenise; claim ``out_dir`` for this run (rank 0 writes ``config.json``)."""
    run = _check_options(opts, out_dir)
    _check_output(run)
    run.model, run.tokenizer, model_id, run.ref_model, ref_id = load_models(
        model, ref_model, tokenizer, dtype=run.dtype, device=run.device, progress=run.show
    )
    max_length = _load_examples(run, data)
    _fix_settings(run, model_id, ref_id, max_length)
    run.packed = PackedScoring.start(run, max_length)  # refuses a model that cannot pack, before any write
    _claim_output(run)
    return run
