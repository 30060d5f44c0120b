"""The end-to-end demo: data, tokenizer, base model, XTF scoring, fine-tuning runs, evaluation.

:func:`run_demo` runs one or more seeds of the controlled comparison and writes everything to
an output directory (see :mod:`xtf_kernels.demo.report` for the files).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .data import NoiseConfig, make_demo_data, write_jsonl
from .scoring import apply_rules, detection_metrics, rule_subsets, score_examples, token_logprobs
from .tokenizer import encode_example, train_tokenizer
from .train import Batchable, ModelSize, clone_model, exact_match, make_model, train

__all__ = ["DemoConfig", "SCALES", "METHODS", "run_seed", "run_demo", "aggregate", "collect"]

#: Methods of the main comparison, in table order.
METHODS: tuple[str, ...] = ("base", "normal_ft", "xtf", "slm", "token_cleaning", "random")
_LABELS = {"base": "Base model (no FT)", "normal_ft": "Normal FT", "xtf": "XTF (RI+KN+TR)", "slm": "SLM (Rho-1)",
           "token_cleaning": "Token Cleaning", "random": "Random masking (XTF ratio)"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of one demo run (every fine-tuning run gets the same budget).

    Attributes:
        n_pretrain, n_finetune, n_reference, n_test: split sizes (examples).
        model: model dimensions.
        vocab_size: tokenizer vocabulary.
        pretrain_steps, finetune_steps: optimizer steps; the SLM / Token Cleaning reference model
            is the base fine-tuned on the clean reference split for ``finetune_steps``.
        batch_size: sequences per step.
        pretrain_lr, finetune_lr: peak learning rates.
        noise: noise probabilities of the fine-tuning split.
        baseline_ratio: kept fraction for SLM / Token Cleaning / random; None = XTF's kept ratio.
        ablation: also fine-tune with each rule alone and each pair.
        scorer: "auto", "framework" or "builtin" (see :func:`score_examples`).
        max_new_tokens: greedy decoding budget.
    """

    n_pretrain: int = 4000
    n_finetune: int = 1600
    n_reference: int = 400
    n_test: int = 300
    model: ModelSize = field(default_factory=ModelSize)
    vocab_size: int = 512
    pretrain_steps: int = 1500
    finetune_steps: int = 400
    batch_size: int = 16
    pretrain_lr: float = 3e-3
    finetune_lr: float = 2e-3
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    baseline_ratio: float | None = None
    ablation: bool = False
    scorer: str = "auto"
    max_new_tokens: int = 72

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


#: ``--scale`` presets (``smoke`` is what CI runs).
SCALES: dict[str, DemoConfig] = {
    "smoke": DemoConfig(n_pretrain=200, n_finetune=64, n_reference=32, n_test=24, vocab_size=400,
                        model=ModelSize(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
                        pretrain_steps=12, finetune_steps=6, batch_size=16, max_new_tokens=48),
    "default": DemoConfig(),
    "medium": DemoConfig(n_pretrain=8000, n_finetune=3000, n_reference=600, n_test=500, pretrain_steps=3000,
                         finetune_steps=800, batch_size=32, model=ModelSize(hidden=96, layers=3, heads=4, kv_heads=2, intermediate=256)),
    "large": DemoConfig(n_pretrain=20000, n_finetune=8000, n_reference=1500, n_test=1000, pretrain_steps=6000,
                        finetune_steps=2000, batch_size=32, model=ModelSize(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512),
                        vocab_size=1024),
}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def run_seed(cfg: DemoConfig, seed: int, out: Path, *, progress: bool = True, quiet: bool = False) -> dict:
    """One seed of the comparison; writes ``out`` (data, scores summary, per-run results).

    Returns:
        dict with ``accuracy`` (method -> exact match), ``losses`` (method -> per-step loss),
        ``kept_frac`` (method -> kept fraction of response tokens), ``detection`` (noise
        precision / recall per rule), ``scorer``, ``timings`` (seconds per phase).
    """
    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg: expected a DemoConfig, got {type(cfg).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. data and tokenizer
    data = make_demo_data(seed, n_pretrain=cfg.n_pretrain, n_finetune=cfg.n_finetune, n_reference=cfg.n_reference,
                          n_test=cfg.n_test, noise=cfg.noise)
    for name, split in (("finetune", data.finetune), ("reference", data.reference), ("test", data.test)):
        write_jsonl(split, out / "data" / f"{name}.jsonl")
    (out / "data" / "pretrain.txt").write_text("\n".join(data.pretrain_texts) + "\n", encoding="utf-8")
    tok = train_tokenizer(data.pretrain_texts + [e.prompt + e.response for e in data.finetune], cfg.vocab_size)
    tok.save_pretrained(str(out / "tokenizer"))
    timings["data"] = time.perf_counter() - t0

    # 2. base model: brief pretraining on clean text
    t = time.perf_counter()
    base = make_model(len(tok), cfg.model, seed)
    losses: dict[str, list[float]] = {}
    losses["pretrain"] = train(base, Batchable.from_texts(tok, data.pretrain_texts), steps=cfg.pretrain_steps,
                               batch_size=cfg.batch_size, lr=cfg.pretrain_lr, seed=seed, desc="pretrain", progress=progress)
    timings["pretrain"] = time.perf_counter() - t
    _log(f"[seed {seed}] pretrained base: {cfg.pretrain_steps} steps, final loss {losses['pretrain'][-1]:.3f}", quiet)

    # 3. XTF scores of the fine-tuning split, and detection of the injected noise
    t = time.perf_counter()
    table = score_examples(base, tok, data.finetune, out / "xtf_scores", scorer=cfg.scorer)
    reasons = apply_rules(table, ("ri", "kn", "tr"))
    timings["score"] = time.perf_counter() - t
    resp = table["is_response"]
    ex_id = table["example_id"]
    bounds = np.searchsorted(ex_id, np.arange(len(data.finetune) + 1))

    def per_example(mask_flat: np.ndarray) -> list[np.ndarray]:
        return [mask_flat[bounds[i] : bounds[i + 1]] for i in range(len(data.finetune))]

    xtf_keep = resp & (reasons == 0)
    xtf_ratio = float(xtf_keep.sum() / max(resp.sum(), 1))
    ratio = xtf_ratio if cfg.baseline_ratio is None else float(cfg.baseline_ratio)
    rng = np.random.default_rng(seed + 12345)
    rand_keep = np.zeros_like(resp)
    ridx = np.flatnonzero(resp)
    rand_keep[rng.choice(ridx, size=int(round(xtf_ratio * ridx.size)), replace=False)] = True
    detection = detection_metrics(table, reasons, rand_keep)
    _log(f"[seed {seed}] XTF ({table['scorer']} scorer) keeps {xtf_ratio:.1%} of response tokens; "
         f"noise recall {detection['XTF (union)']['recall']:.1%}, precision {detection['XTF (union)']['precision']:.1%}", quiet)

    # 4. reference model (SLM / Token Cleaning): base fine-tuned on the clean reference split
    t = time.perf_counter()
    ref = clone_model(base)
    losses["reference"] = train(ref, Batchable.from_examples(tok, data.reference), steps=cfg.finetune_steps,
                                batch_size=cfg.batch_size, lr=cfg.finetune_lr, seed=seed, desc="reference", progress=progress)
    seqs = [encode_example(tok, e)[0] for e in data.finetune]
    ref_lp = token_logprobs(ref, seqs, tok.pad_token_id)
    base_lp = token_logprobs(base, seqs, tok.pad_token_id)
    del ref
    # Token Cleaning (static): influence of the model update on a token = loss_base - loss_ref
    # = logprob_ref - logprob_base (high: the clean reference learned it); keep the top
    infl = np.concatenate([r - b for b, r in zip(base_lp, ref_lp)])
    tc_keep = _top_fraction(infl, resp, ratio)
    timings["reference"] = time.perf_counter() - t

    # 5. fine-tuning runs from the same base, same steps, same batch order
    ft = Batchable.from_examples(tok, data.finetune)
    runs: dict[str, dict] = {
        "normal_ft": {},
        "xtf": {"keep": per_example(xtf_keep)},
        "slm": {"select": _SLMSelect(ratio), "ref": ref_lp},
        "token_cleaning": {"keep": per_example(tc_keep)},
        "random": {"keep": per_example(rand_keep)},
    }
    kept_frac = {"normal_ft": 1.0, "xtf": xtf_ratio, "slm": ratio, "token_cleaning": float(tc_keep.sum() / max(resp.sum(), 1)),
                 "random": float(rand_keep.sum() / max(resp.sum(), 1))}
    if cfg.ablation:
        for sub in rule_subsets()[:-1]:
            k = resp & (apply_rules(table, sub) == 0)
            name = "xtf_" + "+".join(s.upper() for s in sub)
            runs[name] = {"keep": per_example(k)}
            kept_frac[name] = float(k.sum() / max(resp.sum(), 1))
    accuracy: dict[str, float] = {}
    samples: dict[str, list[str]] = {}
    t = time.perf_counter()
    accuracy["base"], samples["base"] = exact_match(base, tok, data.test, max_new_tokens=cfg.max_new_tokens)
    timings["eval"] = time.perf_counter() - t
    timings["finetune"] = 0.0
    for name, spec in runs.items():
        t = time.perf_counter()
        model = clone_model(base)
        d = replace(ft, keep=spec.get("keep"), ref_logprobs=spec.get("ref"))
        losses[name] = train(model, d, steps=cfg.finetune_steps, batch_size=cfg.batch_size, lr=cfg.finetune_lr,
                             seed=seed, select=spec.get("select"), desc=name, progress=progress)
        timings["finetune"] += time.perf_counter() - t
        t = time.perf_counter()
        accuracy[name], samples[name] = exact_match(model, tok, data.test, max_new_tokens=cfg.max_new_tokens)
        timings["eval"] += time.perf_counter() - t
        _log(f"[seed {seed}] {name:<16} kept {kept_frac[name]:6.1%}  exact match {accuracy[name]:6.1%}", quiet)
    timings["total"] = time.perf_counter() - t0
    res = {"seed": seed, "accuracy": accuracy, "kept_frac": kept_frac, "losses": losses, "detection": detection,
           "scorer": table["scorer"], "xtf_ratio": xtf_ratio, "baseline_ratio": ratio, "timings": timings,
           "tr_thresholds": None if table["tr_thresholds"] is None else [float(x) for x in table["tr_thresholds"]],
           "samples": {k: v[:5] for k, v in samples.items()}}
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1), encoding="utf-8")
    (out / "seed_result.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    return res


def _top_fraction(score: np.ndarray, valid: np.ndarray, ratio: float) -> np.ndarray:
    elig = np.flatnonzero(valid & ~np.isnan(score))
    k = int(round(ratio * elig.size))
    keep = np.zeros(valid.shape, dtype=bool)
    keep[elig[np.argsort(-score[elig], kind="stable")[:k]]] = True
    return keep


class _SLMSelect:
    """SLM / Rho-1 ``select=`` policy: keep the top ``ratio`` of tokens by excess loss
    ``loss_current - loss_ref = -logprob_delta``, recomputed at every step with the current model."""

    def __init__(self, ratio: float) -> None:
        self.ratio = float(ratio)

    def __call__(self, stats) -> torch.Tensor:
        score = (-stats.logprob_delta).double().numpy()
        valid = stats.keep.numpy()
        return torch.from_numpy(_top_fraction(score.reshape(-1), valid.reshape(-1), self.ratio).reshape(valid.shape))


def run_demo(cfg: DemoConfig, out_dir: str | Path, seeds: Sequence[int] = (0,), *, progress: bool = True,
             quiet: bool = False) -> dict:
    """Run every seed, aggregate mean / std per method and write the report.

    Args:
        cfg: sizes and budgets (see :data:`SCALES`).
        out_dir: output directory (created); per-seed results under ``seed-N/``.
        seeds: seeds (each gives different data, tokenizer and model init).
        progress: tqdm bars.
        quiet: no log lines.

    Returns:
        the aggregate results dict written to ``out_dir/results.json``.
    """
    if isinstance(seeds, int) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"seeds: expected a non-empty sequence of ints >= 0, got {seeds!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = [run_seed(cfg, s, out / f"seed-{s}", progress=progress, quiet=quiet) for s in seeds]
    return aggregate(cfg, per_seed, out, seconds=time.perf_counter() - t0)


def aggregate(cfg: DemoConfig | dict, per_seed: Sequence[dict], out_dir: str | Path, *, seconds: float | None = None) -> dict:
    """Mean / std over seeds of :func:`run_seed` results; writes ``results.json`` and the report.

    Args:
        cfg: the run's config (or its dict form).
        per_seed: :func:`run_seed` results (with ``losses``), one per seed.
        out_dir: where ``results.json``, ``table.md``, plots and ``report.html`` go.
        seconds: wall time to record (default: the sum of the seeds' totals).
    """
    from .report import write_report

    if not per_seed:
        raise ValueError("per_seed: expected at least one seed result")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [r["seed"] for r in per_seed]
    methods = list(per_seed[0]["accuracy"])
    agg = {}
    for m in methods:
        a = np.array([r["accuracy"][m] for r in per_seed]) * 100
        k = [r["kept_frac"].get(m, 1.0 if m == "base" else float("nan")) for r in per_seed]
        agg[m] = {"label": _LABELS.get(m, m.replace("xtf_", "XTF rules ")), "mean": float(a.mean()),
                  "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "per_seed": a.tolist(),
                  "kept_frac": float(np.mean(k)) if m != "base" else None}
    det_names = [k for k in per_seed[0]["detection"] if not k.startswith("_")]
    detection = {n: {f: float(np.mean([r["detection"][n][f] for r in per_seed])) for f in per_seed[0]["detection"][n]}
                 for n in det_names}
    if seconds is None:
        seconds = float(sum(r["timings"]["total"] for r in per_seed))
    results = {"config": cfg.to_dict() if isinstance(cfg, DemoConfig) else cfg, "seeds": seeds, "methods": agg,
               "detection": detection, "noise_tokens": per_seed[0]["detection"]["_noise_tokens"],
               "scorer": per_seed[0]["scorer"], "seconds": seconds,
               "per_seed": [{k: v for k, v in r.items() if k != "losses"} for r in per_seed]}
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    write_report(results, [r["losses"] for r in per_seed], out)
    return results


def collect(out_dir: str | Path, search: Sequence[str | Path]) -> dict:
    """Aggregate ``seed_result.json`` files found under ``search`` directories (seeds run as
    separate processes) into ``out_dir``; the config is read from each seed's ``config.json``."""
    files = sorted({p for d in search for p in Path(d).rglob("seed_result.json")})
    if not files:
        raise ValueError(f"search: no seed_result.json under {list(map(str, search))}")
    per_seed = [json.loads(p.read_text()) for p in files]
    cfgs = [json.loads((p.parent / "config.json").read_text()) for p in files]
    if any(c != cfgs[0] for c in cfgs):
        raise ValueError("search: the seed results were produced with different configs")
    seeds = [r["seed"] for r in per_seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"search: duplicate seeds {seeds}")
    return aggregate(cfgs[0], sorted(per_seed, key=lambda r: r["seed"]), out_dir)
