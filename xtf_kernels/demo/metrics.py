"""The demo's ground-truth metrics: exact match by template group, filler and answer-phrase
shares of generations, noise share of a kept set, and retention of the KN-masked token types."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .data import MathExample, chat_words, noise_shares
from .tokenizer import encode_example
from .train import extract_answer, teacher_forced_logprobs

__all__ = ["SEEN_TEMPLATES", "generation_metrics", "kept_noise_share", "kn_masked_types", "retention"]

#: Templates in the pretraining text; the others are the fine-tuning's new knowledge.
SEEN_TEMPLATES: tuple[int, ...] = (0, 1, 2)
_WORD = re.compile(r"[a-z]+")


def generation_metrics(texts: Sequence[str], examples: Sequence[MathExample]) -> dict:
    """Exact match overall / seen templates / new templates, and the share of generations that
    contain filler (a word of the conversational domain) or the phrase "The answer is".

    Returns:
        ``{"exact_match": {"all", "seen", "new"}, "filler_share", "answer_phrase_share"}``
        (fractions in [0, 1]; a group without examples gives NaN).
    """
    if len(texts) != len(examples) or not examples:
        raise ValueError(f"texts: expected one generation per example ({len(examples)}), got {len(texts)}")
    ok = np.array([extract_answer(t) == e.answer for t, e in zip(texts, examples)])
    seen = np.array([e.template in SEEN_TEMPLATES for e in examples])
    words = chat_words()
    filler = np.array([bool(set(_WORD.findall(t.lower())) & words) for t in texts])
    phrase = np.array(["The answer is" in t for t in texts])

    def mean(a: np.ndarray) -> float:
        return float(a.mean()) if a.size else float("nan")

    return {"exact_match": {"all": mean(ok), "seen": mean(ok[seen]), "new": mean(ok[~seen])},
            "filler_share": mean(filler), "answer_phrase_share": mean(phrase)}


def kept_noise_share(keep: np.ndarray, noise: np.ndarray) -> float:
    """Share of kept tokens that are injected noise of any kind (``keep`` bool ``[N]``, ``noise``
    int ``[N]``); :func:`~xtf_kernels.demo.data.noise_shares` splits it by kind."""
    return noise_shares(keep, noise)["all"]


def kn_masked_types(table: dict, *, min_count: int = 20, share: float = 0.5) -> list[int]:
    """Token ids with ``>= min_count`` response occurrences that KN masks at ``>= share`` of them."""
    resp = np.asarray(table["is_response"], bool)
    ids = np.asarray(table["token_id"], np.int64)[resp]
    kn = (np.asarray(table["reasons"])[resp] & 2) > 0
    n = np.bincount(ids)
    m = np.bincount(ids, weights=kn.astype(np.float64), minlength=n.size)
    return [int(i) for i in np.flatnonzero((n >= min_count) & (m >= share * np.maximum(n, 1)))]


def retention(model, tokenizer, examples: Sequence[MathExample], type_ids: Sequence[int]) -> float:
    """Mean teacher-forced P(gold) of the tokens of ``type_ids`` in the examples' clean responses."""
    if not type_ids:
        return float("nan")
    types = np.asarray(sorted(type_ids), np.int64)
    seqs, starts = [], []
    for e in examples:
        clean = MathExample(e.prompt, e.clean_response, e.clean_response, e.answer, e.template)
        ids, n_prompt, _ = encode_example(tokenizer, clean)
        seqs.append(ids)
        starts.append(n_prompt)
    lps = teacher_forced_logprobs(model, seqs, tokenizer.pad_token_id)
    vals = []
    for ids, n_p, lp in zip(seqs, starts, lps):
        r = np.asarray(ids[n_p:], np.int64)
        sel = np.isin(r, types)
        vals.append(np.exp(lp[n_p:][sel]))
    v = np.concatenate(vals) if vals else np.zeros(0)
    return float(v.mean()) if v.size else float("nan")
