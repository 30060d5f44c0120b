"""After pass 2: counts reduced across ranks -> ``summary.json`` (the per-type diagnostics included)."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .. import rundir
from .. import shards as sh
from ..rules import N_REASON_MASKS, REASONS, overlap_counts, type_diagnostics
from ..summary import build_summary, count_types
from .pass2 import TokenTexts
from .prepare import ScoreRun
from .reduce import Between

__all__ = ["write_summary"]


def _local_counts(run: ScoreRun) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, this rank's counts per exact reason bitmask + tokens/prompt/examples, per-type counts)."""
    keys = [f"only:{b}" for b in range(N_REASON_MASKS)]
    local = np.zeros(len(keys) + 3, dtype=np.int64)
    per_type = np.zeros((2 + len(REASONS), run.vocab), dtype=np.int64)  # see count_types
    for s in run.mine:
        t = sh.read_shard(run.shard_path(rundir.TOKENS, s), ["example_id", "token_id", "is_response", "reasons"])
        resp = t["is_response"].to_numpy()
        count_types(per_type, t["token_id"].to_numpy()[resp], t["reasons"].to_numpy()[resp])
        oc = overlap_counts(t["reasons"].to_numpy(), resp)
        local[: len(keys)] += np.array([oc[k] for k in keys], dtype=np.int64)
        local[len(keys)] += resp.size
        local[len(keys) + 1] += int((~resp).sum())
        local[len(keys) + 2] += len(np.unique(t["example_id"].to_numpy()))
    return keys, local, per_type


def write_summary(run: ScoreRun, between: Between, texts: TokenTexts, n_tok: int, elapsed: float) -> dict:
    """The run's summary (identical on every rank); rank 0 writes ``summary.json``."""
    keys, local, per_type = _local_counts(run)
    tot = sh.all_reduce_sum(local)
    per_type = sh.all_reduce_sum(per_type)
    summary = build_summary(tot, keys, run.tstats, len(run.examples), run.rules, between.thresholds,
                            between.tr_note, between.trel.info, run.fingerprint, run.n_shards, run.settings)
    summary["diagnostics"] = type_diagnostics(
        per_type[0], per_type[1], {r.name: per_type[2 + i] for i, r in enumerate(REASONS)},
        lambda i: texts(np.asarray([i]))[0])
    if run.packed is not None:
        paths = [run.shard_path(rundir.TOKENS, s) for s in run.mine]
        cuts = between.thresholds if not run.rules.official else (None if between.cut is None else [between.cut])
        summary.update(run.packed.summary(paths, run.rules, cuts))
    if run.rank == 0:
        sh.write_json_atomic(summary, run.out / "summary.json")
        if run.show and n_tok:
            tqdm.write(f"xtf: scored {n_tok} tokens in {elapsed:.1f}s ({n_tok / max(elapsed, 1e-9):.0f} tokens/s)"
                       f" -> {run.out}")
    sh.barrier()
    if run.rank == 0:  # every rank is past its last write: older temp files belong to no live writer of this run
        rundir.remove_stale_tmp(run.out, older_than=run.run_start)
    return summary
