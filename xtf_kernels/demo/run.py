"""The end-to-end demo: data, tokenizer, base model, XTF scoring, fine-tuning arms, evaluation.

:func:`run_demo` runs one or more seeds of the controlled comparison and writes everything to
an output directory (``results.json``, ``report.html``, per-seed files; see
:mod:`xtf_kernels.demo.report`). The fine-tuning arms of a seed run in ``workers`` forked
processes (one torch thread each).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..xtf import RuleConfig
from ..xtf.relevance import GSM8K_DOMAIN_WORDS
from .arms import Arm, static_arms
from .data import NOISE_KINDS, NoiseConfig, make_demo_data, noise_shares, write_jsonl
from .metrics import generation_metrics, kept_noise_share, kn_masked_types, retention
from .scoring import detection_metrics, score_examples
from .tokenizer import train_tokenizer
from .train import (
    Batchable,
    ModelSize,
    clone_model,
    count_params,
    greedy_answers,
    make_model,
    train,
    with_lora,
)

__all__ = ["DemoConfig", "SCALES", "METHODS", "run_seed", "run_demo", "ensure_native"]

#: Methods of the main comparison, in table order.
METHODS: tuple[str, ...] = ("normal", "xtf", "random", "slm", "token_cleaning")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of one demo run (every fine-tuning arm gets the same budget).

    Attributes:
        n_pretrain, n_finetune, n_reference, n_validation, n_test: split sizes (examples).
        chat_fraction: share of conversational documents in the pretraining text.
        model: model dimensions; vocab_size: BPE vocabulary.
        pretrain_steps, finetune_steps: optimizer steps; the SLM / Token Cleaning reference
            model is the base fine-tuned on the clean reference split with the same regime.
        batch_size: sequences per step.
        pretrain_lr, finetune_lr: peak learning rates.
        regime: ``"full"`` fine-tuning or ``"lora"`` (peft, attention and MLP, embeddings and
            head frozen, rank ``lora_r``).
        noise: noise probabilities of the fine-tuning split.
        baseline_ratio: kept fraction of SLM / Token Cleaning / random; None = XTF's.
        methods: arms of the main comparison (subset of :data:`METHODS`).
        ablation: also each rule alone and each pair.
        readings: also XTF under the paper preset, official with RI received, official with
            input-embedding TR.
        eval_split: ``"test"`` (reported numbers) or ``"validation"`` (design choices).
        workers: processes for the fine-tuning arms.
        max_new_tokens: greedy decoding budget.
        scorer: kept for compatibility; only the framework scorer exists.
    """

    n_pretrain: int = 4000
    n_finetune: int = 1600
    n_reference: int = 400
    n_validation: int = 300
    n_test: int = 300
    chat_fraction: float = 0.3
    model: ModelSize = field(default_factory=ModelSize)
    vocab_size: int = 1024
    pretrain_steps: int = 1200
    finetune_steps: int = 300
    batch_size: int = 16
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    regime: str = "full"
    lora_r: int = 8
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    baseline_ratio: float | None = None
    methods: tuple[str, ...] = METHODS
    ablation: bool = False
    readings: bool = False
    eval_split: str = "test"
    workers: int = 2
    max_new_tokens: int = 64
    scorer: str = "framework"

    def __post_init__(self) -> None:
        if self.regime not in ("full", "lora"):
            raise ValueError(f"regime: expected 'full' or 'lora', got {self.regime!r}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split: expected 'test' or 'validation', got {self.eval_split!r}")
        if not set(self.methods) <= set(METHODS):
            raise ValueError(f"methods: expected a subset of {METHODS}, got {self.methods!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: expected a positive int, got {self.workers!r}")

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d


#: ``--scale`` presets (``smoke`` is what CI runs).
SCALES: dict[str, DemoConfig] = {
    "smoke": DemoConfig(n_pretrain=200, n_finetune=64, n_reference=32, n_validation=24, n_test=24,
                        model=ModelSize(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
                        pretrain_steps=12, finetune_steps=6, batch_size=16, max_new_tokens=48, workers=1),
    "default": DemoConfig(),
    "medium": DemoConfig(n_pretrain=8000, n_finetune=3000, n_reference=600, n_validation=500, n_test=500,
                         pretrain_steps=3000, finetune_steps=800, batch_size=32),
}


def _log(msg: str, quiet: bool) -> None:
    """A progress line, on stderr with the progress bars: stdout starts with the results."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def ensure_native(quiet: bool = False) -> str:
    """Build the native masked_ce backend now if it is not cached (prints a line meanwhile).

    Returns:
        ``"cached"``, ``"compiled in N s"`` or ``"unavailable: why"`` (the torch backend is used).
    """
    from .. import _native_build as nb

    src = nb.source_dir()
    if src is None:
        return "unavailable: no C++ sources"
    name = f"xtf_native_{nb.build_key(src)}"
    cached = (nb.cache_root() / name / "BUILD_OK").is_file()
    if not cached:
        _log("compiling the native masked_ce backend (first run only, about a minute) ...", quiet)
    t = time.perf_counter()
    try:
        nb.load_native()
    except RuntimeError as e:
        _log(f"native backend unavailable ({str(e)[:200]}); using the torch backend", quiet)
        return f"unavailable: {str(e)[:200]}"
    return "cached" if cached else f"compiled in {time.perf_counter() - t:.0f} s"


def _per_example(flat: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    return [flat[bounds[i] : bounds[i + 1]] for i in range(bounds.size - 1)]


_SHARE_KEYS = ("all", *NOISE_KINDS, "targeted")

# state shared with the forked arm workers (set before the pool starts)
_STATE: dict = {}


def _finetune(base, cfg: DemoConfig, data: Batchable, seed: int, *, select=None, record=None, desc: str = "ft",
              progress: bool = False):
    model = clone_model(base).requires_grad_(True)
    if cfg.regime == "lora":
        model = with_lora(model, cfg.lora_r, seed=seed)
    losses = train(model, data, steps=cfg.finetune_steps, batch_size=cfg.batch_size, lr=cfg.finetune_lr, seed=seed,
                   select=select, desc=desc, progress=progress, record=record)
    return model, losses


def _evaluate(model, tok, split, kn_types) -> dict:
    texts = greedy_answers(model, tok, [e.prompt for e in split], max_new_tokens=_STATE["cfg"].max_new_tokens)
    out = generation_metrics(texts, split)
    out["retention"] = retention(model, tok, split, kn_types)
    out["samples"] = texts[:5]
    return out


def _run_arm(arm: Arm) -> dict:
    torch.set_num_threads(1)
    st = _STATE
    cfg, seed, ft = st["cfg"], st["seed"], st["ft"]
    t = time.perf_counter()
    record: dict = {}
    if arm.select is not None:
        data = Batchable(ft.ids, ft.n_prompt, ref_logprobs=st["ref_lp"], noise=st["noise"])
    else:
        data = Batchable(ft.ids, ft.n_prompt, keep=_per_example(arm.keep, st["bounds"]))
    model, losses = _finetune(st["base"], cfg, data, seed, select=arm.select, record=record, desc=arm.key)
    t_ft = time.perf_counter() - t
    res = _evaluate(model, st["tok"], st["eval"], st["kn_types"])
    if arm.select is not None:  # the mean over steps of what the policy kept
        steps = record.get("kept_noise", [])
        shares = {k: float(np.mean([r[k] for r in steps])) if steps else float("nan") for k in _SHARE_KEYS}
    else:
        shares = noise_shares(arm.keep, st["noise_flat"])
    res.update(kept_fraction=arm.kept_fraction, kept_noise_share=shares["all"], kept_noise_by_kind=shares, losses=losses,
               seconds={"finetune": t_ft, "eval": time.perf_counter() - t - t_ft})
    return res


def _run_arms(arms: dict[str, Arm], workers: int) -> dict[str, dict]:
    items = list(arms.values())
    if workers <= 1 or len(items) <= 1:
        return {a.key: _run_arm(a) for a in items}
    import multiprocessing as mp

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with mp.get_context("fork").Pool(min(workers, len(items))) as pool:
        out = pool.map(_run_arm, items, chunksize=1)
    return {a.key: r for a, r in zip(items, out)}


def _readings(base, tok, finetune, out: Path) -> dict[str, np.ndarray]:
    """The readings arms: the paper preset, official with RI received, official with input-embedding TR."""
    paper = score_examples(base, tok, finetune, out / "xtf_scores_paper", rules=RuleConfig(preset="paper"))
    words = list(GSM8K_DOMAIN_WORDS)
    recv = score_examples(base, tok, finetune, out / "xtf_scores_ri_received", rules=RuleConfig(ri_source="received"),
                          domain_words=words)
    inp = score_examples(base, tok, finetune, out / "xtf_scores_input_tr", rules=RuleConfig(tr_source="input"),
                         domain_words=words)
    return {"xtf_paper": paper["keep"], "xtf_ri_received": recv["keep"], "xtf_input_tr": inp["keep"]}


def _pretrain_key(cfg: DemoConfig, seed: int) -> str:
    keys = ("n_pretrain", "n_finetune", "n_reference", "n_validation", "n_test", "chat_fraction", "model", "vocab_size",
            "pretrain_steps", "batch_size", "pretrain_lr", "noise")
    return json.dumps([seed] + [asdict(cfg)[k] for k in keys], sort_keys=True, default=str)


def run_seed(cfg: DemoConfig, seed: int, out: Path, *, progress: bool = True, quiet: bool = False,
             base_cache: dict | None = None) -> dict:
    """One seed of the comparison; writes ``out`` (data, scores, ``seed_result.json``).

    Returns:
        dict with ``methods`` (key -> metrics of that arm on the evaluation split, ``base``
        included), ``detection``, ``diagnostics`` (no ground truth, from ``summary.json``),
        ``xtf_ratio``, ``params``, ``timings``.

    ``base_cache`` (a dict) reuses a pretrained base across calls with the same data and
    pretraining settings (the design-choice sweep of :mod:`xtf_kernels.demo.selection`).
    """
    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg: expected a DemoConfig, got {type(cfg).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = make_demo_data(seed, n_pretrain=cfg.n_pretrain, n_finetune=cfg.n_finetune, n_reference=cfg.n_reference,
                          n_test=cfg.n_test, n_validation=cfg.n_validation, chat_fraction=cfg.chat_fraction,
                          noise=cfg.noise)
    for name in ("finetune", "reference", "validation", "test"):
        write_jsonl(getattr(data, name), out / "data" / f"{name}.jsonl")
    tok = train_tokenizer(data.pretrain_texts + [e.prompt + e.response for e in data.finetune], cfg.vocab_size)
    tok.save_pretrained(str(out / "tokenizer"))
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    key = _pretrain_key(cfg, seed)
    if base_cache is not None and key in base_cache:
        base, pre_losses = base_cache[key]
    else:
        base = make_model(len(tok), cfg.model, seed)
        pre_losses = train(base, Batchable.from_texts(tok, data.pretrain_texts), steps=cfg.pretrain_steps,
                           batch_size=cfg.batch_size, lr=cfg.pretrain_lr, seed=seed, desc="pretrain", progress=progress)
        base.requires_grad_(False)
        if base_cache is not None:
            base_cache[key] = (base, pre_losses)
    losses = {"pretrain": pre_losses}
    timings["pretrain"] = time.perf_counter() - t
    _log(f"[seed {seed}] pretrained the base ({count_params(base):,} parameters, vocabulary {len(tok)}): "
         f"{cfg.pretrain_steps} steps, final loss {losses['pretrain'][-1]:.3f}, {timings['pretrain']:.0f} s", quiet)

    ft = Batchable.from_examples(tok, data.finetune)
    ref = None
    if {"slm", "token_cleaning"} & set(cfg.methods):
        t = time.perf_counter()
        ref, losses["reference"] = _finetune(base, cfg, Batchable.from_examples(tok, data.reference), seed,
                                             desc="reference", progress=progress)
        if cfg.regime == "lora":
            ref = ref.merge_and_unload()
        timings["reference"] = time.perf_counter() - t

    t = time.perf_counter()
    # the headline arm: the official preset with the released GSM8K domain words (the demo is math)
    table = score_examples(base, tok, data.finetune, out / "xtf_scores", ref_model=ref,
                           domain_words=list(GSM8K_DOMAIN_WORDS))
    readings = _readings(base, tok, data.finetune, out) if cfg.readings else None
    timings["score"] = time.perf_counter() - t
    resp = np.asarray(table["is_response"], bool)
    arms = static_arms(table, cfg.methods, seed=seed, ratio=cfg.baseline_ratio, ablation=cfg.ablation,
                       readings=readings)
    xtf_ratio = float(np.asarray(table["keep"]).sum() / max(int(resp.sum()), 1))
    rand = arms["random"].keep if "random" in arms else None
    detection = detection_metrics(table, table["reasons"], rand)
    full_noise = noise_shares(resp, table["noise"])
    _log(f"[seed {seed}] XTF keeps {xtf_ratio:.1%} of response tokens; noise share of the kept set "
         f"{kept_noise_share(table['keep'], table['noise']):.1%} (full data {full_noise['all']:.1%})",
         quiet)

    bounds = np.searchsorted(table["example_id"], np.arange(len(data.finetune) + 1))
    ref_lp = _per_example(table["ref_logprob"], bounds) if "ref_logprob" in table else None
    split = data.test if cfg.eval_split == "test" else data.validation
    kn_types = kn_masked_types(table)
    _STATE.update(cfg=cfg, seed=seed, ft=ft, base=base, tok=tok, eval=split, kn_types=kn_types, bounds=bounds,
                  ref_lp=ref_lp, noise=_per_example(table["noise"], bounds), noise_flat=table["noise"])
    t = time.perf_counter()
    methods = {"base": _evaluate(base, tok, split, kn_types)}
    methods["base"].update(kept_fraction=None, kept_noise_share=None, kept_noise_by_kind=None, losses=[])
    _log(f"[seed {seed}] fine-tuning {len(arms)} arms ({cfg.regime}, {cfg.finetune_steps} steps each, "
         f"{min(cfg.workers, len(arms))} worker(s)) ...", quiet)
    methods.update(_run_arms(arms, cfg.workers))
    timings["finetune_and_eval"] = time.perf_counter() - t
    _STATE.clear()
    for k, r in methods.items():
        losses[k] = r.pop("losses")
        if k != "base":
            _log(f"[seed {seed}] {k:<18} kept {r['kept_fraction']:6.1%}  exact match {r['exact_match']['all']:6.1%}"
                 f"  (seen {r['exact_match']['seen']:.1%}, new {r['exact_match']['new']:.1%})", quiet)
    timings["total"] = time.perf_counter() - t0
    summary = table["summary"]
    res = {"seed": seed, "eval_split": cfg.eval_split, "methods": methods, "detection": detection,
           "diagnostics": summary.get("diagnostics"), "xtf_ratio": xtf_ratio, "params": count_params(base),
           "vocab": len(tok), "kn_masked_types": [tok.convert_ids_to_tokens(i) for i in kn_types],
           "full_noise_share": full_noise["all"], "full_noise_by_kind": full_noise,
           "tr_thresholds": summary["thresholds"]["tr"]["thresholds"], "tr_cut": summary["thresholds"]["tr"].get("t_TR"),
           "preset": summary.get("preset"), "timings": timings}
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1), encoding="utf-8")
    (out / "seed_result.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    (out / "losses.json").write_text(json.dumps(losses), encoding="utf-8")
    res["losses"] = losses
    return res


def run_demo(cfg: DemoConfig, out_dir: str | Path, seeds: Sequence[int] = (0,), *, progress: bool = True,
             quiet: bool = False) -> dict:
    """Run every seed, aggregate mean / std per method and write ``results.json`` and the report.

    Args:
        cfg: sizes and budgets (see :data:`SCALES`).
        out_dir: output directory (created); per-seed results under ``seed-N/``.
        seeds: seeds (each gives different data, tokenizer and model init).
        progress: tqdm bars.
        quiet: no log lines.
    """
    from .aggregate import aggregate

    if isinstance(seeds, int) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"seeds: expected a non-empty sequence of ints >= 0, got {seeds!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    native = ensure_native(quiet)
    per_seed = [run_seed(cfg, s, out / f"seed-{s}", progress=progress, quiet=quiet) for s in seeds]
    return aggregate(cfg, per_seed, out, seconds=time.perf_counter() - t0, native=native)
