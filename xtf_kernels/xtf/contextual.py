"""Contextual task relevance (``RuleConfig(tr_source="contextual")``): the global reductions.

Under the contextual reading S_TR is per occurrence: the distance of the base model's final
hidden state at that position to the domain vector V (the mean final hidden state over all
response tokens of the dataset), min-max normalised over the dataset, then Multi-Otsu. Every
step that needs the whole dataset is a reduction that gives the same bits on any number of
ranks:

* V: each pass-1 shard stores its float64 sum of response hidden states (shard metadata); the
  per-shard sums are gathered as a ``[shards, D]`` array (all-reduce of a zero-filled array:
  exact) and added in shard order.
* distances: pass 2 re-runs the decoder per shard (the paper's second pass) and writes
  ``ctx/shard-XXXXX.parquet`` (column ``tr_dist``), resumable like the other shards.
* min / max of the distances: all-reduce max (exact); the [0, 1] histogram of the normalised
  scores: all-reduce sum of integers (exact).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import shards as sh
from .multiotsu import bin_edges, fixed_histogram, multiotsu_from_histogram
from .scorers import decoder_hidden, hidden_distance

__all__ = ["HIDDEN_SUM_KEY", "hidden_sum_meta", "encode_meta", "ContextualTR"]

HIDDEN_SUM_KEY = "xtf_hidden_sum"


def hidden_sum_meta(hidden: torch.Tensor, is_response: torch.Tensor) -> tuple[np.ndarray, int]:
    """float64 ``[D]`` sum of the hidden states at response positions, and their count."""
    h = hidden.double()[is_response.to(hidden.device)]
    return h.sum(0).cpu().numpy(), int(h.shape[0])


def encode_meta(total: np.ndarray, count: int) -> str:
    """Shard-metadata value of a hidden-state sum (JSON; float repr round-trips exactly)."""
    return json.dumps({"sum": [float(x) for x in total], "count": int(count)})


class ContextualTR:
    """The contextual-TR steps between and in the passes of :func:`score_dataset`.

    Args:
        out: run directory; n_shards: shards of the run; mine: this rank's shards.
        metric: ``"cosine"`` or ``"euclidean"``; nbins / classes: Multi-Otsu settings.
    """

    def __init__(self, out: Path, n_shards: int, mine: Sequence[int], metric: str, nbins: int, classes: int) -> None:
        self.out, self.n_shards, self.mine = Path(out), n_shards, list(mine)
        self.metric, self.nbins, self.classes = metric, nbins, classes
        self.domain: torch.Tensor | None = None
        self.dmin = self.dmax = float("nan")
        self.info: dict = {}

    def domain_vector(self, dim: int) -> torch.Tensor:
        """V from the pass-1 shards' metadata (exact, rank-count independent)."""
        sums = np.zeros((self.n_shards, dim), dtype=np.float64)
        counts = np.zeros(self.n_shards, dtype=np.int64)
        for s in self.mine:
            meta = pq.read_schema(self.out / "pass1" / f"shard-{s:05d}.parquet").metadata or {}
            d = json.loads(meta[HIDDEN_SUM_KEY.encode()])
            sums[s], counts[s] = np.asarray(d["sum"], dtype=np.float64), int(d["count"])
        sums, counts = sh.all_reduce_sum(sums), sh.all_reduce_sum(counts)
        total = int(counts.sum())
        if total == 0:
            raise ValueError("no response tokens: cannot compute the contextual domain vector")
        v = np.zeros(dim, dtype=np.float64)
        for s in range(self.n_shards):  # fixed order: the same bits on any number of ranks
            v += sums[s]
        self.domain = torch.from_numpy(v / total)
        self.info = {"metric": self.metric, "domain": "response_hidden_states", "occurrences": total}
        return self.domain

    @torch.no_grad()
    def distances(self, model, examples, shard: int, *, batch_size: int, pad_id: int, device, pad_fn) -> np.ndarray:
        """float64 distances of one shard's rows (NaN at prompt tokens), in pass-1 row order."""
        out = []
        for s in range(0, len(examples), batch_size):
            batch = examples[s : s + batch_size]
            ids, mask = pad_fn(batch, pad_id, device)
            d = hidden_distance(decoder_hidden(model, ids, mask), self.domain, self.metric).cpu().numpy()
            for b, e in enumerate(batch):
                n = len(e.input_ids)
                row = d[b, :n].copy()
                row[: e.n_prompt] = np.nan
                out.append(row)
        return np.concatenate(out) if out else np.zeros(0)

    def write_distances(self, model, examples_of, meta: dict, *, resume: bool, **kw) -> None:
        """Pass 2a: ``ctx/shard-XXXXX.parquet`` for this rank's shards (skips valid ones on resume)."""
        for s in self.mine:
            dst = self.out / "ctx" / f"shard-{s:05d}.parquet"
            if resume and sh.shard_ok(dst, meta):
                continue
            d = self.distances(model, examples_of(s), s, **kw)
            sh.write_table_atomic(pa.table({"tr_dist": d}), dst, meta)

    def _dist(self, s: int) -> np.ndarray:
        return sh.read_shard(self.out / "ctx" / f"shard-{s:05d}.parquet")["tr_dist"].to_numpy()

    def thresholds(self) -> tuple[np.ndarray | None, str | None]:
        """Global min / max, then Multi-Otsu thresholds of the normalised scores (bin edges)."""
        mm = np.full(2, -np.inf)
        for s in self.mine:
            d = self._dist(s)
            d = d[~np.isnan(d)]
            if d.size:
                mm = np.maximum(mm, [-d.min(), d.max()])
        mm = sh.all_reduce_max(mm)
        self.dmin, self.dmax = float(-mm[0]), float(mm[1])
        self.info.update(distance_min=self.dmin, distance_max=self.dmax)
        hist = np.zeros(self.nbins, dtype=np.int64)
        for s in self.mine:
            hist += fixed_histogram(self.scores(s), 0.0, 1.0, self.nbins)
        hist = sh.all_reduce_sum(hist)
        try:
            return multiotsu_from_histogram(hist, bin_edges(0.0, 1.0, self.nbins), self.classes), None
        except ValueError as e:
            return None, f"TR rule off: {e}"

    def scores(self, s: int) -> np.ndarray:
        """S_TR of shard ``s``'s rows: ``1 - (d - min) / (max - min)``, float32 (as saved, so the
        histogram and the rules see the saved values); NaN at prompt tokens."""
        d = self._dist(s)
        if not np.isfinite(self.dmin) or self.dmax <= self.dmin:
            return np.where(np.isnan(d), np.nan, 1.0).astype(np.float32)
        return (1.0 - (d - self.dmin) / (self.dmax - self.dmin)).astype(np.float32)
