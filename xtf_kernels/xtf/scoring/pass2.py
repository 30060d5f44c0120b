"""Pass 2: S_TR, the rules and the reason bitmask -> ``tokens/shard-XXXXX.parquet``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import rundir
from .. import shards as sh
from ..released import capped_ri_mask
from ..rules import apply_rules, ri_fence_mask
from .prepare import ScoreRun
from .reduce import Between

__all__ = ["TokenTexts", "run_pass2"]


class TokenTexts:
    """Token id -> its text (decoded once per id, special tokens and spaces kept)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for t in ids.tolist():
            s = self.cache.get(t)
            if s is None:
                s = self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                self.cache[t] = s
            out.append(s)
        return out


def _final_table(run: ScoreRun, between: Between, s: int, texts: TokenTexts) -> pa.Table:
    t = sh.read_shard(run.shard_path(rundir.PASS1, s))
    cols = {c: t[c].to_numpy() for c in t.column_names}
    tr = between.tr_scores(s, cols["token_id"])
    cols["tr"] = np.where(cols["is_response"], tr, np.nan).astype(np.float32)
    reasons, keep = apply_rules(cols, run.rules, between.thresholds, tr_cut=between.cut)
    if run.rules.official:  # the released fence with its cap (NaN under the released, constant RI)
        _, fences = capped_ri_mask(cols["ri"], cols["example_id"], cols["is_response"], run.rules.ri_k,
                                   run.rules.percentages[0])
    else:
        _, fences = ri_fence_mask(cols["ri"], cols["example_id"], cols["is_response"], run.rules.ri_k)
    fence = np.array([fences.get(int(e), np.nan) for e in cols["example_id"]], dtype=np.float32)
    data_cols = {c: cols[c] for c in ("example_id", "position", "token_id")}
    data_cols["token_text"] = pa.array(texts(cols["token_id"]), pa.string())
    data_cols["is_response"] = cols["is_response"]
    for c in ("ri", "kn", "tr", "logprob", "entropy", "ref_logprob"):
        if c in cols:
            data_cols[c] = cols[c].astype(np.float32)
    data_cols["ri_fence"] = fence
    data_cols["keep"] = keep
    data_cols["reasons"] = reasons.astype(np.uint8)
    return pa.table(data_cols)


def run_pass2(run: ScoreRun, between: Between, texts: TokenTexts) -> int:
    """Write this rank's final shards; returns how many were reused (then a barrier)."""
    reused = 0
    for s in run.mine:
        dst = run.shard_path(rundir.TOKENS, s)
        if run.opts.resume and sh.shard_ok(dst, between.meta):
            reused += 1
            continue
        sh.write_table_atomic(_final_table(run, between, s, texts), dst, between.meta)
    sh.barrier()
    return reused
