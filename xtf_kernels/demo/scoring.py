"""XTF scores of the demo's fine-tuning split, through the framework only.

:func:`score_examples` calls :func:`xtf_kernels.xtf.score_dataset` (the ``xtf score``
machinery: Parquet shards and ``summary.json`` in ``out_dir``) and returns its token table as
NumPy columns, aligned with the demo's own tokenisation and extended with the ground-truth
noise labels. The rules are the framework's :func:`xtf_kernels.xtf.apply_rules`; nothing is
re-implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..xtf import RuleConfig, apply_rules, score_dataset
from .data import NOISE_KINDS, MathExample
from .tokenizer import encode_example, noise_token_labels

__all__ = ["RULES", "rule_subsets", "score_examples", "reasons_for", "detection_metrics"]

RULES: tuple[str, ...] = ("ri", "kn", "tr")
_COLS = ("example_id", "position", "token_id", "is_response", "ri", "kn", "tr", "logprob", "keep", "reasons")


def rule_subsets() -> list[tuple[str, ...]]:
    """The 7 non-empty subsets of ("ri", "kn", "tr"): each alone, each pair, all three."""
    r = RULES
    return [(a,) for a in r] + [(r[i], r[j]) for i in range(3) for j in range(i + 1, 3)] + [r]


def score_examples(model, tokenizer, examples: Sequence[MathExample], out_dir: str | Path, *,
                   ref_model=None, rules: RuleConfig | None = None, batch_size: int = 32, **options) -> dict:
    """Score every token of ``examples`` with XTF (frozen ``model``), via ``score_dataset``.

    Args:
        model: the base causal LM (fp32, CPU).
        tokenizer: the demo tokenizer.
        examples: fine-tuning examples.
        out_dir: the ``xtf score`` output directory (overwritten).
        ref_model: optional reference model: its log-probs become the ``ref_logprob`` column.
        rules: :class:`~xtf_kernels.xtf.RuleConfig` (default: the official preset).
        batch_size: sequences per forward.
        **options: further :func:`~xtf_kernels.xtf.score_dataset` options (``tr_source``,
            ``ri_aggregation`` ...).

    Returns:
        dict of NumPy columns over all tokens, sorted by (example, position): ``example_id``,
        ``position``, ``token_id``, ``is_response``, ``ri``, ``kn``, ``tr``, ``logprob``,
        ``keep``, ``reasons`` (``ref_logprob`` with a reference model) and ``noise`` (0 clean,
        else the kind's index in :data:`NOISE_KINDS` + 1); plus ``summary`` (the run's
        ``summary.json``), ``tr_thresholds`` (paper) and ``tr_cut`` (official t_TR).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not examples:
        raise ValueError("examples: expected at least one example")
    out = Path(out_dir)
    records = [{"prompt": e.prompt, "response": e.response} for e in examples]
    summary = score_dataset(model, records, out, tokenizer=tokenizer, rules=rules, batch_size=batch_size,
                            dtype="fp32", device="cpu", overwrite=True, progress=False, ref_model=ref_model,
                            max_length=model.config.max_position_embeddings, **options)
    tbl = pa.concat_tables([pq.read_table(f) for f in sorted((out / "tokens").glob("shard-*.parquet"))])
    cols = _COLS + (("ref_logprob",) if ref_model is not None else ())
    t = {c: tbl[c].to_numpy() for c in cols}
    order = np.lexsort((t["position"], t["example_id"]))
    t = {k: np.asarray(v)[order] for k, v in t.items()}
    expect = np.concatenate([encode_example(tokenizer, e)[0] for e in examples])
    if t["token_id"].shape != expect.shape or not np.array_equal(t["token_id"].astype(np.int64), expect):
        raise RuntimeError("score_dataset tokenised the examples differently from the demo; noise labels cannot be aligned")
    t["noise"] = np.concatenate([noise_token_labels(tokenizer, e)[0] for e in examples])
    thr = summary["thresholds"]["tr"]["thresholds"]
    t["tr_thresholds"] = None if thr is None else np.asarray(thr, np.float64)
    t["tr_cut"] = summary["thresholds"]["tr"].get("t_TR")
    t["summary"] = summary
    return t


def reasons_for(table: dict, rules: RuleConfig) -> np.ndarray:
    """Reason bitmask (uint8 ``[N]``) of ``rules`` on a scored table (same TR thresholds or cut).

    ``rules`` must have the preset the table was scored with (its ``tr`` column is S_TR under
    ``paper``, the relevance under ``official``)."""
    if rules.preset != table["summary"].get("preset", "paper"):
        raise ValueError(f"rules: preset {rules.preset!r} differs from the scored table's")
    reasons, _ = apply_rules(table, rules, table["tr_thresholds"], tr_cut=table.get("tr_cut"))
    return reasons


def detection_metrics(table: dict, reasons: np.ndarray, keep_random: np.ndarray | None = None) -> dict:
    """Precision / recall of masks against the injected noise, per rule and per noise kind.

    Args:
        table: output of :func:`score_examples` (``is_response``, ``noise``).
        reasons: uint8 ``[N]`` reason bitmask of all three rules.
        keep_random: optional bool ``[N]`` keep mask of random masking (a chance baseline).

    Returns:
        ``{mask name: {"masked_frac", "precision", "recall", "recall_<kind>"...}}`` for RI, KN, TR,
        XTF (union) and random; precision = noisy share of masked response tokens.
    """
    resp = np.asarray(table["is_response"], bool)
    noise = np.asarray(table["noise"])[resp]
    r = np.asarray(reasons)[resp]
    masks = {"RI": (r & 1) > 0, "KN": (r & 2) > 0, "TR": (r & 4) > 0, "XTF (union)": r > 0}
    if keep_random is not None:
        masks["random (matched)"] = ~np.asarray(keep_random, bool)[resp]
    out: dict[str, dict] = {}
    noisy = noise > 0
    for name, m in masks.items():
        d = {"masked_frac": float(m.mean()) if m.size else 0.0,
             "precision": float((m & noisy).sum() / max(m.sum(), 1)),
             "recall": float((m & noisy).sum() / max(noisy.sum(), 1))}
        for k, kind in enumerate(NOISE_KINDS, start=1):
            sel = noise == k
            d[f"recall_{kind}"] = float((m & sel).sum() / max(sel.sum(), 1))
        out[name] = d
    out["_noise_tokens"] = {kind: int((noise == k).sum()) for k, kind in enumerate(NOISE_KINDS, start=1)}
    out["_noise_tokens"]["response"] = int(resp.sum())
    return out
