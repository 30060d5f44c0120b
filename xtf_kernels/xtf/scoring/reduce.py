"""Between the passes: the dataset-global parts of task relevance, reduced across ranks.

Official preset: the relevance of every distinct token id run alone (or its input-embedding
row) against the domain words' vector, the per-id occurrence counts (all tokens, prompt
included) all-reduced as integers, then a 5-class Multi-Otsu and the released pick (t_TR).

Paper preset, input-embedding TR: the response-token histogram over the vocabulary (all-reduce
sum) gives the domain vector and S_TR per token id; the fixed-bin [0, 1] histogram of S_TR
gives the Multi-Otsu thresholds. Contextual TR: :class:`~xtf_kernels.xtf.contextual.ContextualTR`
(domain vector from the pass-1 hidden-state sums, a decoder pass for the distances).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .. import rundir
from .. import shards as sh
from ..contextual import ContextualTR
from ..multiotsu import bin_edges, fixed_histogram, multiotsu_from_histogram
from ..released import official_tr_cut
from ..relevance import GSM8K_DOMAIN_WORDS, domain_vector, frequent_words, token_relevance
from ..scorers import TaskRelevance
from .pass1 import pad_batch
from .prepare import ScoreRun

__all__ = ["Between", "reduce_between_passes", "GSM8K_DOMAIN_WORDS"]


@dataclass
class Between:
    """What pass 2 and the summary need from the global reductions."""

    trel: TaskRelevance
    tr_vocab: np.ndarray
    ctx: ContextualTR | None
    thresholds: np.ndarray | None
    tr_note: str | None
    meta: dict[str, str]  # pass-2 shard metadata: the fingerprint and the thresholds
    cut: float | None = None  # official: t_TR

    def tr_scores(self, shard: int, token_ids: np.ndarray) -> np.ndarray:
        """S_TR of a pass-1 shard's rows."""
        return self.ctx.scores(shard) if self.ctx is not None else self.tr_vocab[token_ids.astype(np.int64)]


def _contextual_thresholds(run: ScoreRun, trel: TaskRelevance) -> tuple[ContextualTR, np.ndarray | None, str | None]:
    ctx = ContextualTR(run.out, run.n_shards, run.mine, run.opts.tr_metric, run.rules.tr_nbins, run.rules.tr_classes)
    ctx.domain_vector(int(run.model.get_input_embeddings().weight.shape[1]))
    ctx.write_distances(run.model, run.shard_examples, run.meta, resume=run.opts.resume,
                        batch_size=run.opts.batch_size, pad_id=run.pad_id, device=run.device, pad_fn=pad_batch)
    sh.barrier()
    thresholds, note = ctx.thresholds()
    trel.info = ctx.info
    return ctx, thresholds, note


def _vocab_thresholds(run: ScoreRun, local_counts: np.ndarray, tr_vocab: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    nbins = run.rules.tr_nbins
    present = local_counts > 0
    local_hist = fixed_histogram(tr_vocab[present], 0.0, 1.0, nbins, weights=local_counts[present])
    hist = sh.all_reduce_sum(np.rint(local_hist).astype(np.int64))
    try:
        return multiotsu_from_histogram(hist, bin_edges(0.0, 1.0, nbins), run.rules.tr_classes), None
    except ValueError as e:
        return None, f"TR rule off: {e}"


def _default_domain_words(run: ScoreRun) -> list[str]:
    tok = run.tokenizer
    texts = (tok.decode(e.input_ids[e.n_prompt :], skip_special_tokens=True) for e in run.examples)
    return frequent_words(texts, 16)


def _official_reduce(run: ScoreRun) -> Between:
    """Official TR: the relevance of every distinct token id of the data (prompt included), the
    occurrence counts reduced across ranks, ``t_TR`` from their Multi-Otsu and the released pick."""
    local = np.zeros((2, run.vocab), dtype=np.int64)  # all occurrences, response occurrences
    for s in run.mine:
        t = sh.read_shard(run.shard_path(rundir.PASS1, s), ["token_id", "is_response"])
        ids = t["token_id"].to_numpy().astype(np.int64)
        local[0] += np.bincount(ids, minlength=run.vocab)[: run.vocab]
        local[1] += np.bincount(ids[t["is_response"].to_numpy()], minlength=run.vocab)[: run.vocab]
    counts = sh.all_reduce_sum(local).astype(np.int64)
    given = run.opts.domain_words is not None
    words = list(run.opts.domain_words) if given else _default_domain_words(run)
    source = run.rules.tr_source
    info: dict = {"metric": "cosine similarity (higher = more relevant)", "source": source,
                  "domain": "words" if given else "most frequent response words", "domain_words": words,
                  "distinct_tokens": int((counts[0] > 0).sum()), "occurrences": int(counts[0].sum()),
                  "response_occurrences": int(counts[1].sum()), "keys": "token id"}
    present = np.flatnonzero(counts[0] > 0)
    tr_vocab = np.full(run.vocab, np.nan, dtype=np.float32)
    cut, thresholds, note = None, None, None
    # the scores are written whatever rules are on (ablations read them)
    V, used, skipped = domain_vector(run.model, run.tokenizer, words, source)
    info["domain_words_used"], info["domain_words_skipped"] = used, skipped
    tr_vocab[present] = token_relevance(run.model, present, V, source, batch_size=max(512, run.opts.batch_size))
    try:
        got = official_tr_cut(tr_vocab[present], counts[0][present], run.rules.tr_classes, run.rules.tr_nbins)
        thresholds, cut = np.asarray(got["thresholds"]), got["cut"]
        info.update(thresholds_multiotsu=got["thresholds"], proportions=got["proportions"], cut=cut, range=got["range"])
    except ValueError as e:
        note = f"TR rule off: {e}"
    trel = TaskRelevance(run.vocab, "cosine")
    trel.counts = counts[1]
    trel.info = info
    meta = {**run.final_meta, "xtf_tr_thresholds": json.dumps(None if thresholds is None else [float(x) for x in thresholds]),
            "xtf_tr_cut": json.dumps(cut)}
    return Between(trel=trel, tr_vocab=tr_vocab, ctx=None, thresholds=thresholds, tr_note=note, meta=meta, cut=cut)


def reduce_between_passes(run: ScoreRun) -> Between:
    """Domain vector, S_TR and the Multi-Otsu thresholds, identical on every rank."""
    if run.rules.official:
        return _official_reduce(run)
    trel = TaskRelevance(run.vocab, run.opts.tr_metric)
    for s in run.mine:
        t = sh.read_shard(run.shard_path(rundir.PASS1, s), ["token_id", "is_response"])
        trel.add(t["token_id"].to_numpy()[t["is_response"].to_numpy()])
    local_counts = trel.counts.copy()
    trel.counts = sh.all_reduce_sum(local_counts).astype(np.int64)
    # S_TR is a float32 quantity from here on: the histogram, the rules and the saved column all
    # see the same values, so a token's class always agrees with the thresholds (bin edges)
    tr_vocab = trel.finalize(run.model.get_input_embeddings().weight.detach(), run.domain_ids).astype(np.float32)
    ctx = None
    if run.contextual:
        ctx, thresholds, tr_note = _contextual_thresholds(run, trel)
    else:
        thresholds, tr_note = _vocab_thresholds(run, local_counts, tr_vocab)
    meta = {**run.final_meta, "xtf_tr_thresholds": json.dumps(None if thresholds is None else [float(x) for x in thresholds])}
    return Between(trel=trel, tr_vocab=tr_vocab, ctx=ctx, thresholds=thresholds, tr_note=tr_note, meta=meta)
