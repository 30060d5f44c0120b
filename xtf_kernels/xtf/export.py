"""``export_dataset``: the scored dataset as training data (labels = -100 on masked and prompt tokens)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .policies import make_policy, matched_ratio
from .shards import write_table_atomic

__all__ = ["load_token_table", "export_dataset"]


def load_token_table(out_dir: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """All final token records of a scored run (``out_dir/tokens/shard-*.parquet``), in order.

    Raises:
        FileNotFoundError: no shards (the run was not scored or did not reach pass 2).
    """
    d = Path(out_dir) / "tokens"
    files = sorted(d.glob("shard-*.parquet"))
    if not files:
        raise FileNotFoundError(f"out_dir: no token shards under {d}; run `xtf score` first")
    summ = Path(out_dir) / "summary.json"
    if summ.is_file():
        n = json.loads(summ.read_text()).get("shards")
        if n is not None and n != len(files):
            raise ValueError(f"out_dir: {len(files)} of {n} shards present; finish the run (xtf score resumes)")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def export_dataset(
    out_dir: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    format: str | None = None,
    policy: str = "xtf",
    ratio: float | None = None,
    seed: int = 0,
    ignore_index: int = -100,
) -> dict:
    """Write ``input_ids`` + ``labels`` (+ ``keep``) per example for any trainer.

    Args:
        out_dir: a scored run directory.
        dest: output file (``.jsonl`` or ``.parquet``).
        format: ``"jsonl"`` / ``"parquet"`` (default: from ``dest``'s suffix).
        policy: ``"xtf"`` (the rules' keep mask), or a baseline: ``"slm"``, ``"token_cleaning"``
            (need a run with ``ref_model``), ``"random"``, ``"entropy"``.
        ratio: kept fraction for a baseline (default: XTF's kept fraction, a matched ratio).
        seed: seed of the random policy.
        ignore_index: label of masked and prompt tokens.

    Returns:
        ``{"examples", "tokens", "response", "trained", "policy", "ratio", "path"}``.
    """
    dest = Path(dest)
    fmt = format or dest.suffix.lstrip(".")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"format: expected 'jsonl' or 'parquet' (or a dest ending in one), got {fmt!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    t = load_token_table(out_dir)
    cols = {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names if c != "token_text"}
    resp = cols["is_response"].astype(bool)
    if policy == "xtf":
        keep = cols["keep"].astype(bool)
        used_ratio = None
    else:
        if ratio is None:
            ratio = matched_ratio(json.loads((Path(out_dir) / "summary.json").read_text()))
        kw = {"seed": seed} if policy == "random" else {}
        pol = make_policy(policy, ratio, **kw)
        keep = pol.keep_mask(cols, resp)
        used_ratio = float(ratio)
    ex = cols["example_id"]
    order = np.lexsort((cols["position"], ex))
    ex_s, ids_s, keep_s = ex[order], cols["token_id"][order].astype(np.int64), keep[order]
    uniq, starts = np.unique(ex_s, return_index=True)
    bounds = np.append(starts, ex_s.size)
    labels_all = np.where(keep_s, ids_s, ignore_index)
    recs = {"example_id": [], "input_ids": [], "labels": [], "keep": []}
    for i, e in enumerate(uniq):
        a, b = bounds[i], bounds[i + 1]
        recs["example_id"].append(int(e))
        recs["input_ids"].append(ids_s[a:b].tolist())
        recs["labels"].append(labels_all[a:b].tolist())
        recs["keep"].append(keep_s[a:b].tolist())
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        write_table_atomic(pa.table(recs), dest)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for j in range(len(uniq)):
                    f.write(json.dumps({k: recs[k][j] for k in recs}) + "\n")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return {"examples": int(len(uniq)), "tokens": int(ex.size), "response": int(resp.sum()),
            "trained": int(keep.sum()), "policy": policy, "ratio": used_ratio, "path": str(dest)}
