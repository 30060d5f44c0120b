"""The ``summary.json`` of a scored run, and the small helpers of :func:`score_dataset` it shares.

Everything here works on counts already reduced across ranks (no model, no I/O).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .data import TokenizeStats
from .rules import RuleConfig

__all__ = ["PAPER", "build_summary", "count_types", "with_readings"]

PAPER = (
    "Yang et al., Explainable Token-level Noise Filtering for LLM Fine-tuning Datasets, "
    "ICLR 2026, arXiv:2602.14536"
)


def build_summary(tot, keys, tstats: TokenizeStats, n_examples, cfg: RuleConfig, thresholds, tr_note, tr_info,
             fp, n_shards, settings) -> dict:
    only = {k: int(v) for k, v in zip(keys, tot[: len(keys)])}
    bits = np.arange(8)
    cnt = np.array([only[f"only:{b}"] for b in range(8)])

    def n(mask: int) -> int:
        return int(cnt[(bits & mask) == mask].sum())

    response = int(cnt.sum())
    kept = int(cnt[0])
    masked = {"RI": n(1), "KN": n(2), "TR": n(4), "any": response - kept}
    frac = {k: (v / response if response else 0.0) for k, v in masked.items()}
    pairs = {}
    for a, b, m in (("RI", "KN", 3), ("RI", "TR", 5), ("KN", "TR", 6)):
        both = n(m)
        union = masked[a] + masked[b] - both
        pairs[f"{a}&{b}"] = {"both": both, "jaccard": both / union if union else 0.0,
                             "overlap_of_smaller": both / min(masked[a], masked[b]) if min(masked[a], masked[b]) else 0.0}
    names = {0: "none", 1: "RI", 2: "KN", 3: "RI+KN", 4: "TR", 5: "RI+TR", 6: "KN+TR", 7: "RI+KN+TR"}
    thr = {
        "ri": {"rule": "per sequence: mask S_RI < Q1 - k * (Q3 - Q1)", "k": cfg.ri_k},
        "kn": {"rule": "mask S_KN < threshold", "threshold": cfg.kn_threshold},
        "tr": {
            "rule": f"Multi-Otsu, {cfg.tr_classes} classes over a {cfg.tr_nbins}-bin [0, 1] histogram; mask class {cfg.tr_masked_class} (0 = lowest mean)",
            "thresholds": None if thresholds is None else [float(x) for x in thresholds],
            "masked_range": None if thresholds is None else _class_range(thresholds, cfg.tr_masked_class),
            "note": tr_note,
            **tr_info,
        },
        "enabled": list(cfg.enabled),
    }
    return {
        "paper": PAPER,
        "fingerprint": fp,
        "shards": n_shards,
        "examples": {"records": tstats.records, "scored": n_examples, "skipped": dict(tstats.skipped),
                     "truncated": tstats.truncated, "skip_messages": tstats.errors[:20]},
        "tokens": {"total": int(tot[len(keys)]), "prompt": int(tot[len(keys) + 1]), "response": response,
                   "kept": kept, "masked": response - kept},
        "masked": masked,
        "masked_fraction": frac,
        "overlap": {"pairs": pairs, "all_three": n(7),
                    "combinations": {names[b]: int(cnt[b]) for b in range(8)}},
        "thresholds": thr,
        "settings": settings,
    }


def with_readings(cfg: RuleConfig, tr_source, ri_aggregation, protect) -> RuleConfig:
    """``cfg`` with the readings given as keyword arguments of ``score_dataset``."""
    over = {k: v for k, v in (("tr_source", tr_source), ("ri_aggregation", ri_aggregation)) if v is not None}
    if protect is not None:
        if isinstance(protect, (str, bytes, int)):
            raise TypeError(f"protect: expected a sequence of token ids, got {type(protect).__name__}")
        over["protect"] = tuple(protect)
    return dataclasses.replace(cfg, **over) if over else cfg


def count_types(acc: np.ndarray, ids: np.ndarray, reasons: np.ndarray) -> None:
    """Add per-token-id counts (occurrences, masked, RI, KN, TR) of response tokens to ``acc`` [5, V]."""
    V = acc.shape[1]
    ids = ids.astype(np.int64)
    r = reasons.astype(np.int64)
    acc[0] += np.bincount(ids, minlength=V)[:V]
    for row, sel in ((1, r > 0), (2, (r & 1) > 0), (3, (r & 2) > 0), (4, (r & 4) > 0)):
        acc[row] += np.bincount(ids[sel], minlength=V)[:V]


def _class_range(thresholds, k: int) -> list[float | None]:
    t = [float(x) for x in thresholds]
    lo = t[k - 1] if k >= 1 else None
    hi = t[k] if k < len(t) else None
    return [lo, hi]
