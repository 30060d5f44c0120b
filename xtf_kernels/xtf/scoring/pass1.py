"""Pass 1: the model forward per shard -> ``pass1/shard-XXXXX.parquet``.

Per token: attention received (RI), KN = 1 - p(gold), log-prob and entropy from the fused
masked-CE statistics on the final hidden states, and the reference model's log-prob when one
is given. Under the contextual TR reading each shard also stores its sum of response hidden
states (shard metadata) for the domain vector.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from .. import rundir
from .. import shards as sh
from ..contextual import HIDDEN_SUM_KEY, encode_meta, hidden_sum_meta
from ..data import Example
from ..scorers import HiddenCapture, decoder_hidden, knowledge_novelty, reasoning_importance
from .prepare import ScoreRun

__all__ = ["pad_batch", "pending_pass1", "run_pass1"]

_COLUMNS = ("example_id", "position", "token_id", "is_response", "ri", "kn", "logprob", "entropy", "ref_logprob")


def pad_batch(batch: Sequence[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded int64 ``input_ids`` and ``attention_mask`` ``[B, max length]`` on ``device``."""
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, : len(e.input_ids)] = 1
    return ids.to(device), mask.to(device)


def _add_hidden_sum(hidden_sum: list, hidden: torch.Tensor, ids: torch.Tensor, batch: Sequence[Example]) -> None:
    """Contextual TR: add the batch's sum of response hidden states to the shard's."""
    resp = torch.zeros(ids.shape, dtype=torch.bool)
    for b, e in enumerate(batch):
        resp[b, e.n_prompt : len(e.input_ids)] = True
    hs, hn = hidden_sum_meta(hidden, resp)
    hidden_sum[0] = hs if hidden_sum[0] is None else hidden_sum[0] + hs
    hidden_sum[1] += hn


def _append_rows(cols: dict[str, list[np.ndarray]], batch: Sequence[Example], ri: torch.Tensor,
                 kn: dict[str, torch.Tensor], ref_lp: torch.Tensor | None) -> None:
    ri_np = ri.cpu().numpy()
    kn_np = {k: v.cpu().numpy() for k, v in kn.items()}
    ref_np = None if ref_lp is None else ref_lp.float().cpu().numpy()
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        cols["example_id"].append(np.full(n, e.example_id, dtype=np.int64))
        cols["position"].append(np.arange(n, dtype=np.int32))
        cols["token_id"].append(np.asarray(e.input_ids, dtype=np.int32))
        cols["is_response"].append(np.arange(n) >= e.n_prompt)
        cols["ri"].append(ri_np[b, :n].astype(np.float32))
        cols["kn"].append(kn_np["kn"][b, :n].astype(np.float32))
        cols["logprob"].append(kn_np["logprob"][b, :n].astype(np.float32))
        cols["entropy"].append(kn_np["entropy"][b, :n].astype(np.float32))
        cols["ref_logprob"].append(
            np.full(n, np.nan, np.float32) if ref_np is None else ref_np[b, :n].astype(np.float32))


@torch.no_grad()
def _score_shard(run: ScoreRun, examples: Sequence[Example], pbar, hidden_sum: list | None = None) -> pa.Table:
    model, ref_model, backend = run.model, run.ref_model, run.opts.backend
    cols: dict[str, list[np.ndarray]] = {k: [] for k in _COLUMNS}
    cap = HiddenCapture(model)
    try:
        for s in range(0, len(examples), run.opts.batch_size):
            batch = examples[s : s + run.opts.batch_size]
            ids, mask = pad_batch(batch, run.pad_id, run.device)
            cap.value = None
            ri = reasoning_importance(model, ids, mask, layers=run.opts.ri_layers, reduce=run.ri_reduce,
                                      ri_fn=run.ri_fn)
            hidden = cap.value
            if hidden is None or tuple(hidden.shape[:2]) != tuple(ids.shape):
                hidden = decoder_hidden(model, ids, mask)
            ref_lp = None
            if ref_model is not None:
                ref_lp = knowledge_novelty(ref_model, ids, mask, backend=backend)["logprob"]
            kn = knowledge_novelty(model, ids, mask, hidden=hidden, ref_logprobs=ref_lp, backend=backend)
            if hidden_sum is not None:
                _add_hidden_sum(hidden_sum, hidden, ids, batch)
            _append_rows(cols, batch, ri, kn, ref_lp)
            if pbar is not None:
                pbar.update(int(mask.sum()))
    finally:
        cap.close()
    if ref_model is None:
        del cols["ref_logprob"]
    return pa.table({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})


def pending_pass1(run: ScoreRun) -> tuple[list[int], int, int]:
    """(this rank's shards still to score, shards reused on all ranks, tokens to score here)."""
    resume = run.opts.resume
    todo = [s for s in run.mine if not (resume and sh.shard_ok(run.shard_path(rundir.PASS1, s), run.meta))]
    reused = int(sh.all_reduce_sum(np.array([len(run.mine) - len(todo)], dtype=np.int64))[0])
    if run.show and reused:
        tqdm.write(f"xtf: resuming the run in {run.out}: pass 1 already done for {reused} of {run.n_shards} shards")
    n_tok = sum(len(e.input_ids) for s in todo for e in run.shard_examples(s))
    return todo, reused, n_tok


def run_pass1(run: ScoreRun, todo: Sequence[int], n_tok: int) -> float:
    """Score and write the shards in ``todo``; returns the seconds it took (then a barrier)."""
    t0 = time.perf_counter()
    desc = "xtf pass 1" + (f" (rank {run.rank})" if run.world > 1 else "")
    pbar = tqdm(total=n_tok, unit="tok", unit_scale=True, desc=desc, disable=not run.show or not todo,
                dynamic_ncols=True)
    try:
        for s in todo:
            hsum = [None, 0] if run.contextual else None
            score = run.packed.score_shard if run.packed is not None else _score_shard
            tbl = score(run, run.shard_examples(s), pbar, hidden_sum=hsum)
            extra = {} if hsum is None else {HIDDEN_SUM_KEY: encode_meta(
                hsum[0] if hsum[0] is not None else np.zeros(0), hsum[1])}
            sh.write_table_atomic(tbl, run.shard_path(rundir.PASS1, s), {**run.meta, **extra})
    finally:
        pbar.close()
    elapsed = time.perf_counter() - t0
    sh.barrier()
    return elapsed
