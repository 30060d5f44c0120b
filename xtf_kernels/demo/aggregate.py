"""Mean / spread over seeds, ``results.json`` and the plain-words interpretation of a demo run.

``results.json`` keys: ``methods.<key>`` for ``base``, ``normal``, ``xtf``, ``random``, ``slm``,
``token_cleaning`` and the ablation / readings arms, each with ``exact_match: {all, seen,
new}`` (means over seeds, fractions in [0, 1]), ``per_seed`` and ``std`` of the same three,
``kept_fraction``, ``kept_noise_share`` (SLM: the mean over steps), ``kept_noise_by_kind``
(``all``, ``filler``, ``boilerplate``, ``corrupt``, ``targeted`` = filler + boilerplate),
``noise_vs_full`` ("HIGHER" above 1.1x the full data's injected-noise share, "lower" below
it / 1.1, else "similar") and ``noise_rises`` (it is "HIGHER": a warning),
``filler_share``, ``answer_phrase_share``, ``retention``; ``full_noise_share`` and
``full_noise_by_kind`` of the full data; plus ``interpretation`` (a paragraph).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .arms import ARM_LABELS

__all__ = ["aggregate", "collect", "interpret"]

_GROUPS = ("all", "seen", "new")


def _mean(v: list) -> float | None:
    a = np.array([x for x in v if x is not None], dtype=np.float64)
    return float(np.nanmean(a)) if a.size and not np.all(np.isnan(a)) else None


def _method(rows: list[dict], key: str) -> dict:
    per = {g: [float(r["exact_match"][g]) for r in rows] for g in _GROUPS}
    out = {"label": ARM_LABELS.get(key, key),
           "exact_match": {g: float(np.mean(per[g])) for g in _GROUPS},
           "std": {g: float(np.std(per[g], ddof=1)) if len(rows) > 1 else 0.0 for g in _GROUPS},
           "per_seed": per}
    for f in ("kept_fraction", "kept_noise_share", "filler_share", "answer_phrase_share", "retention"):
        out[f] = _mean([r.get(f) for r in rows])
    out["kept_noise_by_kind"] = _mean_dicts([r.get("kept_noise_by_kind") for r in rows])
    return out


#: ``noise_rises`` fires when a kept set's noise share exceeds the full data's by more than this
#: fraction of it (19 % -> above 20.9 %): random masking at any ratio stays below it.
NOISE_RISE = 0.10


def _vs_full(ks: float | None, full: float | None) -> str | None:
    """"HIGHER" above (1 + NOISE_RISE) x the full data's noise share, "lower" below it divided by
    that factor, else "similar" (None without both numbers)."""
    if ks is None or full is None or np.isnan(ks):
        return None
    if ks > (1.0 + NOISE_RISE) * full:
        return "HIGHER"
    return "lower" if ks * (1.0 + NOISE_RISE) < full else "similar"


def _flag_noise(methods: dict, full: float) -> None:
    """``noise_vs_full`` and ``noise_rises`` per arm (its kept set holds clearly more injected noise
    than the full data)."""
    for r in methods.values():
        r["noise_vs_full"] = vs = _vs_full(r.get("kept_noise_share"), full)
        r["noise_rises"] = None if vs is None else vs == "HIGHER"


def aggregate(cfg, per_seed: Sequence[dict], out_dir: str | Path, *, seconds: float | None = None,
              native: str | None = None) -> dict:
    """Aggregate :func:`~xtf_kernels.demo.run.run_seed` results; writes ``results.json`` and the report.

    Args:
        cfg: the run's :class:`~xtf_kernels.demo.run.DemoConfig` (or its dict form).
        per_seed: one result per seed (``losses`` optional).
        out_dir: where ``results.json``, ``table.md``, plots and ``report.html`` go.
        seconds: wall time to record (default: the sum of the seeds' totals).
        native: how the native backend was obtained (``ensure_native``'s answer).
    """
    from .report import write_report

    if not per_seed:
        raise ValueError("per_seed: expected at least one seed result")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(per_seed[0]["methods"])
    methods = {k: _method([r["methods"][k] for r in per_seed], k) for k in keys}
    det_names = [k for k in per_seed[0]["detection"] if not k.startswith("_")]
    detection = {n: {f: float(np.mean([r["detection"][n][f] for r in per_seed])) for f in per_seed[0]["detection"][n]}
                 for n in det_names}
    if seconds is None:
        seconds = float(sum(r["timings"]["total"] for r in per_seed))
    results = {
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else cfg,
        "seeds": [r["seed"] for r in per_seed],
        "eval_split": per_seed[0].get("eval_split", "test"),
        "methods": methods,
        "detection": detection,
        "noise_tokens": per_seed[0]["detection"]["_noise_tokens"],
        "full_noise_share": float(np.mean([r["full_noise_share"] for r in per_seed])),
        "full_noise_by_kind": _mean_dicts([r.get("full_noise_by_kind") for r in per_seed]),
        "params": per_seed[0].get("params"),
        "vocab": per_seed[0].get("vocab"),
        "seconds": seconds,
        "native_backend": native,
        "per_seed": [{k: v for k, v in r.items() if k != "losses"} for r in per_seed],
    }
    _flag_noise(methods, results["full_noise_share"])
    results["interpretation"] = interpret(results)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    write_report(results, [r.get("losses", {}) for r in per_seed], out)
    return results


def _mean_dicts(ds: list[dict | None]) -> dict | None:
    """Mean per key over seeds; None unless every seed has the dict (runs of older versions)."""
    if not ds or not all(ds):
        return None
    return {k: _mean([d.get(k) for d in ds]) for k in ds[0]}


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f} %"


def _diag_line(results: dict) -> str:
    diags = [r.get("diagnostics") for r in results.get("per_seed", []) if r.get("diagnostics")]
    if not diags:
        return ""
    d = diags[0].get("always_masked", {})
    top = ", ".join(repr(t["token"]) for t in d.get("top", [])[:8])
    return (f" Without ground truth, the scoring already warns: {d.get('count', 0)} token types (with at least "
            f"{d.get('min_count', 20)} occurrences) are masked at >= {100 * d.get('share', 0.95):.0f} % of their "
            f"occurrences in seed {results['seeds'][0]}{' (' + top + ')' if top else ''}.")


def interpret(results: dict) -> str:
    """A paragraph in plain words of what the numbers show (leads the terminal output and the report)."""
    m = results["methods"]
    n = len(results["seeds"])
    split = results.get("eval_split", "test")
    if "normal" not in m or "xtf" not in m:
        return f"{n} seed(s) on the {split} split; the comparison needs the normal and xtf arms."
    nx, xx = m["normal"], m["xtf"]
    d = xx["exact_match"]["all"] - nx["exact_match"]["all"]
    spread = max(xx["std"]["all"], nx["std"]["all"])
    if n > 1 and abs(d) <= spread:
        verdict = "within the spread over seeds, so this run does not separate them"
    else:
        verdict = "better" if d > 0 else "worse"
        verdict = f"{abs(100 * d):.1f} points {verdict} than normal fine-tuning"
    s = (f"Over {n} seed(s) on the clean {split} split, normal fine-tuning reaches {_pct(nx['exact_match']['all'])} exact "
         f"match and XTF (the official preset) {_pct(xx['exact_match']['all'])}: {verdict}. "
         f"On the templates seen in pretraining XTF scores {_pct(xx['exact_match']['seen'])} against "
         f"{_pct(nx['exact_match']['seen'])}; on the new templates {_pct(xx['exact_match']['new'])} against "
         f"{_pct(nx['exact_match']['new'])}. ")
    full = results.get("full_noise_share")
    ks = xx.get("kept_noise_share")
    vs = _vs_full(ks, full)
    if vs is not None:
        trend = {"HIGHER": "HIGHER than", "similar": "similar to", "lower": "lower than"}[vs]
        warn = " (a warning: the filter concentrates noise)" if vs == "HIGHER" else ""
        s += (f"XTF keeps {_pct(xx['kept_fraction'])} of the response tokens, and {_pct(ks)} of what it keeps is injected "
              f"noise, {trend} the {_pct(full)} of the full data{warn}. ")
    tk, tf = (xx.get("kept_noise_by_kind") or {}).get("targeted"), (results.get("full_noise_by_kind") or {}).get("targeted")
    if tk is not None and tf is not None:
        s += (f"Of the noise XTF targets (filler and boilerplate; corrupted results are outside it) its kept set holds "
              f"{_pct(tk)}, against {_pct(tf)} in the full data. ")
    rising = [r["label"] for k, r in m.items() if k != "normal" and r.get("noise_rises")]
    if rising:
        s += (f"Kept sets with more than {1 + NOISE_RISE:.1f}x the full data's noise share (flagged): "
              f"{'; '.join(rising)}. ")
    if "random" in m:
        s += f"Random masking at the same ratio gives {_pct(m['random']['exact_match']['all'])}. "
    for k, name in (("slm", "SLM"), ("token_cleaning", "Token Cleaning")):
        if k in m:
            s += f"{name} gives {_pct(m[k]['exact_match']['all'])} (kept-set noise {_pct(m[k].get('kept_noise_share'))}). "
    rb, rn, rx = m.get("base", {}).get("retention"), nx.get("retention"), xx.get("retention")
    if rb is not None and rx is not None:
        s += (f"The token types KN masks keep a teacher-forced P(gold) of {_pct(rb)} in the base model, "
              f"{_pct(rn)} after normal fine-tuning and {_pct(rx)} after XTF, "
              f"{'so masked known tokens stay known' if rx >= 0.8 * rb else 'so masked known tokens are NOT kept known (the premise fails here)'}. ")
    s += (f"Generations with filler: {_pct(nx.get('filler_share'))} after normal fine-tuning, {_pct(xx.get('filler_share'))} "
          f"after XTF; with \"The answer is\": {_pct(nx.get('answer_phrase_share'))} and {_pct(xx.get('answer_phrase_share'))}.")
    s += _diag_line(results)
    return s


def collect(out_dir: str | Path, search: Sequence[str | Path]) -> dict:
    """Aggregate ``seed_result.json`` files found under ``search`` directories (seeds run as
    separate processes) into ``out_dir``; the config is read from each seed's ``config.json``."""
    files = sorted({p for d in search for p in Path(d).rglob("seed_result.json")})
    if not files:
        raise ValueError(f"search: no seed_result.json under {list(map(str, search))}")
    per_seed = [json.loads(p.read_text()) for p in files]
    for p, r in zip(files, per_seed):
        lp = p.parent / "losses.json"
        r["losses"] = json.loads(lp.read_text()) if lp.is_file() else {}
    cfgs = [json.loads((p.parent / "config.json").read_text()) for p in files]
    if any(c != cfgs[0] for c in cfgs):
        raise ValueError("search: the seed results were produced with different configs")
    seeds = [r["seed"] for r in per_seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"search: duplicate seeds {seeds}")
    return aggregate(cfgs[0], sorted(per_seed, key=lambda r: r["seed"]), out_dir)
