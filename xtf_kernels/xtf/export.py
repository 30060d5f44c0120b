"""``export_dataset``: the scored dataset as training data (labels = -100 on masked and prompt tokens).

Each record also carries ``keep`` (the policy's mask) and ``response`` (the response tokens:
those a trainer would train on without XTF), so a trainer can say what fraction of the
response it trains on (``XTFSFTTrainer``'s ``xtf/kept_fraction``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .rundir import check_writable_dir, named_os_error
from .shards import atomic_path, write_table_atomic

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
    """Write ``input_ids`` + ``labels`` (+ ``keep``, ``response``) per example for any trainer.

    Per example: ``input_ids``; ``labels`` (the token ids, ``ignore_index`` on prompt and
    masked tokens); ``keep`` (bool, True where trained: the policy's mask, False on prompt
    tokens); ``response`` (bool, True on the response tokens, masked or not).

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
    if dest.is_dir():
        raise IsADirectoryError(f"dest: {dest} is a directory; expected a file path ending in .jsonl or .parquet")
    fmt = format or dest.suffix.lstrip(".")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"format: expected 'jsonl' or 'parquet' (or a dest ending in one), got {fmt!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_writable_dir(dest.parent, "dest")
    t = load_token_table(out_dir)
    cols = {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names if c != "token_text"}
    resp = cols["is_response"].astype(bool)
    if policy == "xtf":
        keep = cols["keep"].astype(bool)
        used_ratio = None
    else:
        from .policies import make_policy, matched_ratio  # imports torch: only for a baseline

        if ratio is None:
            ratio = matched_ratio(json.loads((Path(out_dir) / "summary.json").read_text()))
        kw = {"seed": seed} if policy == "random" else {}
        pol = make_policy(policy, ratio, **kw)
        if "ref_logprob" in pol.needs and ("ref_logprob" not in cols or np.isnan(cols["ref_logprob"][resp]).all()):
            raise ValueError(
                f"policy: {policy!r} needs the reference model's log-probs, which the run in {out_dir} does not "
                "have; score with --ref-model REF_DIR (ref_model= in Python) first"
            )
        keep = pol.keep_mask(cols, resp)
        used_ratio = float(ratio)
    ex = cols["example_id"]
    order = np.lexsort((cols["position"], ex))
    ex_s, ids_s, keep_s, resp_s = ex[order], cols["token_id"][order].astype(np.int64), keep[order], resp[order]
    uniq, starts = np.unique(ex_s, return_index=True)
    bounds = np.append(starts, ex_s.size)
    labels_all = np.where(keep_s, ids_s, ignore_index)
    recs = {"example_id": [], "input_ids": [], "labels": [], "keep": [], "response": []}
    for i, e in enumerate(uniq):
        a, b = bounds[i], bounds[i + 1]
        recs["example_id"].append(int(e))
        recs["input_ids"].append(ids_s[a:b].tolist())
        recs["labels"].append(labels_all[a:b].tolist())
        recs["keep"].append(keep_s[a:b].tolist())
        recs["response"].append(resp_s[a:b].tolist())
    try:
        if fmt == "parquet":
            write_table_atomic(pa.table(recs), dest)
        else:
            with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for j in range(len(uniq)):
                    f.write(json.dumps({k: recs[k][j] for k in recs}) + "\n")
    except OSError as e:
        raise named_os_error(e, f"dest: cannot write {dest}") from e
    return {"examples": int(len(uniq)), "tokens": int(ex.size), "response": int(resp.sum()),
            "trained": int(keep.sum()), "policy": policy, "ratio": used_ratio, "path": str(dest)}
