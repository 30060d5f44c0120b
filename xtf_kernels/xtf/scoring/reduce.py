"""Between the passes: the dataset-global parts of task relevance, reduced across ranks.

Input-embedding TR (default): the response-token histogram over the vocabulary (all-reduce
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
from ..scorers import TaskRelevance
from .pass1 import pad_batch
from .prepare import ScoreRun

__all__ = ["Between", "reduce_between_passes"]


@dataclass
class Between:
    """What pass 2 and the summary need from the global reductions."""

    trel: TaskRelevance
    tr_vocab: np.ndarray
    ctx: ContextualTR | None
    thresholds: np.ndarray | None
    tr_note: str | None
    meta: dict[str, str]  # pass-2 shard metadata: the fingerprint and the thresholds

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


def reduce_between_passes(run: ScoreRun) -> Between:
    """Domain vector, S_TR and the Multi-Otsu thresholds, identical on every rank."""
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
    meta = {**run.meta, "xtf_tr_thresholds": json.dumps(None if thresholds is None else [float(x) for x in thresholds])}
    return Between(trel=trel, tr_vocab=tr_vocab, ctx=ctx, thresholds=thresholds, tr_note=tr_note, meta=meta)
