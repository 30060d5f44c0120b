"""The ``summary.json`` of a scored run, and the small helpers of :func:`score_dataset` it shares.

Everything here works on counts already reduced across ranks (no model, no I/O).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from .data import TokenizeStats
from .rules import N_REASON_MASKS, REASONS, RuleConfig, reason_label

__all__ = ["PAPER", "build_summary", "count_types", "with_readings"]

PAPER = (
    "Yang et al., Explainable Token-level Noise Filtering for LLM Fine-tuning Datasets, "
    "ICLR 2026, arXiv:2602.14536"
)


def build_summary(tot, keys, tstats: TokenizeStats, n_examples, cfg: RuleConfig, thresholds, tr_note, tr_info,
             fp, n_shards, settings) -> dict:
    only = {k: int(v) for k, v in zip(keys, tot[: len(keys)])}
    bits = np.arange(N_REASON_MASKS)
    cnt = np.array([only[f"only:{b}"] for b in range(N_REASON_MASKS)])

    def n(mask: int) -> int:
        return int(cnt[(bits & mask) == mask].sum())

    response = int(cnt.sum())
    kept = int(cnt[0])
    masked = {**{r.name: n(int(r)) for r in REASONS}, "any": response - kept}
    frac = {k: (v / response if response else 0.0) for k, v in masked.items()}
    pairs = {}
    for ra, rb in itertools.combinations(REASONS, 2):
        a, b = ra.name, rb.name
        both = n(int(ra | rb))
        union = masked[a] + masked[b] - both
        pairs[f"{a}&{b}"] = {"both": both, "jaccard": both / union if union else 0.0,
                             "overlap_of_smaller": both / min(masked[a], masked[b]) if min(masked[a], masked[b]) else 0.0}
    thr = _official_thresholds(cfg, tr_note, tr_info) if cfg.official else _paper_thresholds(cfg, thresholds, tr_note, tr_info)
    return {
        "paper": PAPER,
        "fingerprint": fp,
        "preset": cfg.preset,
        "shards": n_shards,
        "examples": {"records": tstats.records, "scored": n_examples, "skipped": dict(tstats.skipped),
                     "truncated": tstats.truncated, "skip_messages": tstats.errors[:20]},
        "tokens": {"total": int(tot[len(keys)]), "prompt": int(tot[len(keys) + 1]), "response": response,
                   "kept": kept, "masked": response - kept},
        "masked": masked,
        "masked_fraction": frac,
        "overlap": {"pairs": pairs, "all_three": n(N_REASON_MASKS - 1),
                    "combinations": {reason_label(b): int(cnt[b]) for b in range(N_REASON_MASKS)}},
        "thresholds": thr,
        "settings": settings,
    }


RI_RELEASED_NOTE = (
    "RI as released is constant: layer 0's attention probabilities averaged over heads and then over the key "
    "axis of [query, key] give 1/L at every position (each softmax row sums to 1), so the rule flags only "
    "rounding noise; here it flags nothing and no attention pass is run (ri_source='received' applies the "
    "released fence and cap to attention received, Eq. 2)"
)


def _paper_thresholds(cfg: RuleConfig, thresholds, tr_note, tr_info) -> dict:
    return {
        "ri": {"rule": "per sequence: mask S_RI < Q1 - k * (Q3 - Q1)", "k": cfg.ri_k,
               "aggregation": cfg.ri_aggregation},
        "kn": {"rule": "mask S_KN < threshold", "threshold": cfg.kn_threshold},
        "tr": {
            "rule": f"Multi-Otsu, {cfg.tr_classes} classes over a {cfg.tr_nbins}-bin [0, 1] histogram; mask class {cfg.tr_masked_class} (0 = lowest mean)",
            "source": cfg.tr_source,
            "thresholds": None if thresholds is None else [float(x) for x in thresholds],
            "masked_range": None if thresholds is None else _class_range(thresholds, cfg.tr_masked_class),
            "note": tr_note,
            **tr_info,
        },
        "enabled": list(cfg.enabled),
    }


def _official_thresholds(cfg: RuleConfig, tr_note, tr_info) -> dict:
    cap_ri, cap_kn, cap_tr = cfg.percentages
    ri = {"rule": f"per sequence: mask ri < Q1 - {cfg.ri_k:g} * IQR; when more than {cap_ri:.0%} of the "
                  f"sequence lies below, the fence becomes sorted_ri[int(n * {cap_ri:g})]",
          "k": cfg.ri_k, "cap": cap_ri, "source": cfg.ri_source}
    if cfg.ri_source == "released":
        ri["note"] = RI_RELEASED_NOTE
    return {
        "ri": ri,
        "kn": {"rule": f"mask p > {1 - cfg.kn_threshold:g} and p > sorted_p[int(n * (1 - {cap_kn:g}))] per sequence "
                       "(p = 1 - S_KN)",
               "threshold": cfg.kn_threshold, "p_threshold": 1.0 - cfg.kn_threshold, "cap": cap_kn},
        "tr": {
            "rule": f"mask rel < t_TR and rel < sorted_rel[int(n * {cap_tr:g})] per sequence; t_TR from a "
                    f"{cfg.tr_classes}-class Multi-Otsu ({cfg.tr_nbins} bins between the minimum and maximum of "
                    "every token occurrence's rel, prompt tokens included) and the released cumulative pick",
            "cap": cap_tr, "t_TR": tr_info.get("cut"), "note": tr_note,
            "thresholds": tr_info.get("thresholds_multiotsu"), "source": cfg.tr_source, **tr_info,
        },
        "enabled": list(cfg.enabled),
        "percentages": list(cfg.percentages),
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
    """Add per-token-id counts of response tokens to ``acc`` ``[2 + len(REASONS), V]``.

    Rows: occurrences, masked (any rule), then one row per rule in :data:`REASONS` order
    (RI, KN, TR): occurrences where that rule fired.
    """
    V = acc.shape[1]
    ids = ids.astype(np.int64)
    r = reasons.astype(np.int64)
    acc[0] += np.bincount(ids, minlength=V)[:V]
    sels = [r > 0] + [(r & int(reason)) > 0 for reason in REASONS]
    for row, sel in enumerate(sels, start=1):
        acc[row] += np.bincount(ids[sel], minlength=V)[:V]


def _class_range(thresholds, k: int) -> list[float | None]:
    t = [float(x) for x in thresholds]
    lo = t[k - 1] if k >= 1 else None
    hi = t[k] if k < len(t) else None
    return [lo, hi]
