"""Pass 1 of ``score_dataset(..., pack=True)``: score packed rows, write the records of an unpacked run.

One forward per group of ``batch_size`` packed rows (:mod:`.packing`):

* RI: the attention collector with the rows' ``position_ids`` (block-diagonal attention, each
  key's per-query average over its own document); the ``"debiased"`` reading divides the
  summed mass by :func:`uniform_received_mass_packed`, uniform causal attention per document.
* hidden states: captured from the same decoder forward; KN / log-prob / entropy from
  ``masked_ce(..., position_ids=...)``, so a document's first token is not predicted from the
  previous document (NaN, as position 0 of an unpacked row).
* reference model: its decoder with ``attention_mask=None`` and the ``position_ids``:
  transformers then builds block-diagonal masks (SDPA / eager) or runs varlen flash attention.

Every example's slice is cut out of its row and the shard's table is written in example order,
so the records equal an unpacked run's up to float rounding. :func:`check_packing_supported`
runs a two-document probe first and refuses models whose attention does not honour packed
``position_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from ...documents import document_bounds, document_starts
from ..contextual import hidden_sum_meta
from ..data import Example
from ..scorers import HiddenCapture, knowledge_novelty
from ..shards import all_reduce_sum, read_shard
from .packing import (
    PackedBatch,
    make_packed_batch,
    near_threshold_count,
    packing_counts,
    packing_summary,
    plan_rows,
)

__all__ = ["PackedScoring", "check_packing_supported", "near_threshold_total", "packing_report", "progress_note",
           "score_shard_packed", "uniform_received_mass_packed"]

_COLUMNS = ("example_id", "position", "token_id", "is_response", "ri", "kn", "logprob", "entropy", "ref_logprob")


def uniform_received_mass_packed(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Uniform causal attention's received mass per document of packed rows (fp64 ``[B, L]``).

    Query ``i`` at position ``p_i`` of its document sees ``p_i + 1`` keys, so key ``j`` receives
    ``sum over later queries i of j's document of 1 / (p_i + 1)``; 0 at padding. Equals
    :func:`~xtf_kernels.xtf.scorers.uniform_received_mass` of each document alone.
    """
    v = attention_mask.to(torch.float64)
    inv = torch.where(v > 0, 1.0 / (position_ids.to(torch.float64) + 1.0), torch.zeros_like(v))
    tail = torch.flip(torch.cumsum(torch.flip(inv, [1]), dim=1), [1])  # sum over i >= j in the row
    # minus what lies past j's document: the row tail from its end on (0 past the row)
    end = document_bounds(document_starts(position_ids)).end
    pad_tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], 1)
    return (tail - pad_tail.gather(1, end)) * v


def _ri(model, batch: PackedBatch, ri_fn, layers, reduce: str) -> torch.Tensor:
    debiased = reduce == "debiased"
    ri = ri_fn(model, batch.input_ids, batch.attention_mask, layers=layers, reduce="sum" if debiased else reduce,
               position_ids=batch.position_ids)
    if not isinstance(ri, torch.Tensor) or tuple(ri.shape) != tuple(batch.input_ids.shape):
        raise ValueError(f"ri_fn: expected a tensor of shape {tuple(batch.input_ids.shape)}, got {getattr(ri, 'shape', ri)!r}")
    if debiased:
        u = uniform_received_mass_packed(batch.attention_mask.to(ri.device), batch.position_ids.to(ri.device))
        return torch.where(u > 0, ri.double() / u.clamp_min(1e-30), torch.zeros_like(u)).float()
    return ri.float()


def _decoder_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states of packed rows; transformers reads the documents from ``position_ids``."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        raise ValueError("model: expected a causal LM with a decoder (get_decoder()) and an LM head")
    out = dec(input_ids=batch.input_ids, attention_mask=None, position_ids=batch.position_ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _kn(model, batch: PackedBatch, hidden: torch.Tensor, ref_logprobs, backend: str) -> dict[str, torch.Tensor]:
    dev = hidden.device
    return knowledge_novelty(model, batch.input_ids.to(dev), batch.attention_mask.to(dev), hidden=hidden,
                             ref_logprobs=ref_logprobs, backend=backend, position_ids=batch.position_ids.to(dev))


def _forward(model, ref_model, batch: PackedBatch, cap, ri_fn, ri_layers, ri_reduce, backend):
    """(ri, hidden, kn dict, ref log-probs or None) of one packed batch."""
    cap.value = None
    ri = _ri(model, batch, ri_fn, ri_layers, ri_reduce)
    hidden = cap.value
    if hidden is None or tuple(hidden.shape[:2]) != tuple(batch.input_ids.shape):
        hidden = _decoder_hidden(model, batch)
    ref_lp = None
    if ref_model is not None:
        ref_lp = _kn(ref_model, batch, _decoder_hidden(ref_model, batch), None, backend)["logprob"]
    return ri, hidden, _kn(model, batch, hidden, ref_lp, backend), ref_lp


@torch.no_grad()
def score_shard_packed(
    model, ref_model, examples: Sequence[Example], *, capacity: int, batch_size: int, pad_id: int,
    device: torch.device, ri_fn, ri_layers, ri_reduce: str, backend: str, pbar, hidden_sum: list | None = None,
) -> pa.Table:
    """The pass-1 table of a shard (the columns and row order of the unpacked path).

    ``hidden_sum`` accumulates the response hidden-state sum for the contextual TR, as the
    unpacked path does.
    """
    token_ids = [e.input_ids for e in examples]
    rows = plan_rows([len(t) for t in token_ids], capacity)
    per_ex: dict[int, tuple] = {}
    cap = HiddenCapture(model)
    try:
        for g in range(0, len(rows), batch_size):
            batch = make_packed_batch(rows[g : g + batch_size], token_ids, pad_id, device)
            ri, hidden, kn, ref_lp = _forward(model, ref_model, batch, cap, ri_fn, ri_layers, ri_reduce, backend)
            if hidden_sum is not None:
                resp = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
                for i, r, s, n in batch.spans:
                    resp[r, s + examples[i].n_prompt : s + n] = True
                hs, hn = hidden_sum_meta(hidden, resp)
                hidden_sum[0] = hs if hidden_sum[0] is None else hidden_sum[0] + hs
                hidden_sum[1] += hn
            ri_np = ri.cpu().numpy()
            kn_np = {k: v.cpu().numpy() for k, v in kn.items()}
            ref_np = None if ref_lp is None else ref_lp.float().cpu().numpy()
            for i, r, s, n in batch.spans:
                sl = slice(s, s + n)
                per_ex[i] = (ri_np[r, sl], kn_np["kn"][r, sl], kn_np["logprob"][r, sl], kn_np["entropy"][r, sl],
                             None if ref_np is None else ref_np[r, sl])
            if pbar is not None:
                pbar.update(int(batch.attention_mask.sum()))
    finally:
        cap.close()
    return _table(examples, per_ex, ref_model is not None)


def _table(examples: Sequence[Example], per_ex: dict[int, tuple], with_ref: bool) -> pa.Table:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in _COLUMNS}
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ri, kn, lp, ent, ref = per_ex[i]
        cols["example_id"].append(np.full(n, e.example_id, dtype=np.int64))
        cols["position"].append(np.arange(n, dtype=np.int32))
        cols["token_id"].append(np.asarray(e.input_ids, dtype=np.int32))
        cols["is_response"].append(np.arange(n) >= e.n_prompt)
        cols["ri"].append(ri.astype(np.float32))
        cols["kn"].append(kn.astype(np.float32))
        cols["logprob"].append(lp.astype(np.float32))
        cols["entropy"].append(ent.astype(np.float32))
        cols["ref_logprob"].append(np.full(n, np.nan, np.float32) if ref is None else ref.astype(np.float32))
    if not with_ref:
        del cols["ref_logprob"]
    return pa.table({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})


def _probe_rows(examples: Sequence[Example]) -> tuple[list[int], list[int]]:
    """Two short documents from the data: ``a`` (up to 6 tokens) and ``b`` (a's first 3 tokens,
    so a leak of ``a`` into ``b`` or ignored positions change ``b``'s states)."""
    ids = list(examples[0].input_ids[:6])
    while len(ids) < 6:
        ids = ids + ids
    return ids[:6], ids[:3]


@torch.no_grad()
def check_packing_supported(model, ref_model, examples: Sequence[Example], *, ri_fn, ri_layers, ri_reduce: str,
                            backend: str, pad_id: int, device: torch.device) -> None:
    """Raise ValueError (``pack: ...``) unless a document scored inside a packed row equals the
    same document scored alone (hidden states, RI and, with a reference model, its log-probs)."""
    a, b = _probe_rows(examples)
    both = make_packed_batch([[0, 1]], [a, b], pad_id, device)
    alone = make_packed_batch([[0]], [b], pad_id, device)
    cap = HiddenCapture(model)
    try:
        got, want = (_forward(model, ref_model, x, cap, ri_fn, ri_layers, ri_reduce, backend) for x in (both, alone))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"pack: {type(model).__name__} cannot score packed rows ({type(e).__name__}: {e}); score without --pack"
        ) from e
    finally:
        cap.close()
    n = len(b)
    pairs = {"hidden states": (got[1][0, 6:], want[1][0, :n]), "RI": (got[0][0, 6:], want[0][0, :n]),
             "KN": (got[2]["kn"][0, 7:], want[2]["kn"][0, 1:n])}
    if ref_model is not None:
        pairs["log-probs under the reference model"] = (got[3][0, 7:], want[3][0, 1:n])
    tol = 1e-4 if got[1].dtype in (torch.float32, torch.float64) else 5e-2
    for name, (x, y) in pairs.items():
        x, y = x.double(), y.double()
        both_nan = torch.isnan(x) & torch.isnan(y)  # e.g. RI not computed (ri_source="released")
        err = float(torch.where(both_nan, torch.zeros_like(x), x - y).abs().max()) if x.numel() else 0.0
        if not err <= tol * max(1.0, float(y.abs().max())):
            who = ref_model if "reference" in name else model
            impl = getattr(getattr(who, "config", None), "_attn_implementation", None)
            role = "the reference model " if who is ref_model else ""
            raise ValueError(
                f"pack: the attention of {role}{type(who).__name__} (attn_implementation={impl!r}) does not honour "
                f"packed position_ids: a document's {name} inside a packed row differ by {err:.3g} from the "
                "document scored alone; score without --pack"
            )


def packing_report(examples: Sequence[Example], shard_size: int, capacity: int, batch_size: int) -> dict[str, int]:
    """:func:`~.packing.packing_counts` summed over every shard of the run (deterministic, no model)."""
    total = {"tokens": 0, "rows": 0, "positions_padded": 0, "positions_packed": 0}
    for s in range(0, len(examples), shard_size):
        lengths = [len(e.input_ids) for e in examples[s : s + shard_size]]
        for k, v in packing_counts(lengths, plan_rows(lengths, capacity), batch_size).items():
            total[k] += v
    return total


def near_threshold_total(paths: Sequence, rules, thresholds) -> int:
    """Near-threshold response tokens (:func:`~.packing.near_threshold_count`) of final shards."""
    cols = ("token_id", "is_response", "ri", "ri_fence", "kn", "tr")
    n = 0
    for p in paths:
        t = read_shard(p, list(cols))
        n += near_threshold_count({c: t[c].to_numpy() for c in cols}, rules, thresholds)
    return n


def progress_note(report: dict) -> str:
    """One line about the padding packing saves: for the progress bar and the final message."""
    s = packing_summary(report, 0)
    return (f"packed {s['tokens']} tokens into {s['rows']} rows: {s['positions_saved']:.0%} fewer positions "
            f"(padding {s['padding_share_padded']:.0%} -> {s['padding_share_packed']:.0%})")


class PackedScoring:
    """What ``score_dataset(..., pack=True)`` does differently, behind three hooks.

    :meth:`start` (None unless ``run.opts.pack``) refuses a model that cannot pack;
    :meth:`score_shard` replaces pass 1's ``_score_shard(run, examples, pbar, hidden_sum)``
    (rows of up to ``max_length`` tokens, ``batch_size`` rows per forward; the progress bar
    shows the padding saved); :meth:`summary` gives ``{"packing": ...}`` for ``summary.json``.
    ``run`` is the :class:`~xtf_kernels.xtf.scoring.prepare.ScoreRun`.
    """

    def __init__(self, examples: Sequence[Example], shard_size: int, capacity: int, batch_size: int) -> None:
        self.capacity = capacity
        self.counts = packing_report(examples, shard_size, capacity, batch_size)

    @classmethod
    def start(cls, run, max_length: int) -> PackedScoring | None:
        """None without ``pack``; else probes the models (:func:`check_packing_supported`)."""
        if not run.opts.pack:
            return None
        check_packing_supported(run.model, run.ref_model, run.examples, ri_fn=run.ri_fn, ri_layers=run.opts.ri_layers,
                                ri_reduce=run.ri_reduce, backend=run.opts.backend, pad_id=run.pad_id,
                                device=run.device)
        return cls(run.examples, run.opts.shard_size, max_length, run.opts.batch_size)

    def score_shard(self, run, examples: Sequence[Example], pbar, hidden_sum: list | None = None) -> pa.Table:
        if pbar is not None:
            pbar.set_postfix_str(progress_note(self.counts), refresh=False)
        return score_shard_packed(run.model, run.ref_model, examples, capacity=self.capacity,
                                  batch_size=run.opts.batch_size, pad_id=run.pad_id, device=run.device,
                                  ri_fn=run.ri_fn, ri_layers=run.opts.ri_layers, ri_reduce=run.ri_reduce,
                                  backend=run.opts.backend, pbar=pbar, hidden_sum=hidden_sum)

    def summary(self, paths: Sequence, rules, thresholds) -> dict:
        """``{"packing": packing_summary(...)}`` with the near-threshold count summed over ranks."""
        near = all_reduce_sum(np.array([near_threshold_total(paths, rules, thresholds)], dtype=np.int64))
        return {"packing": packing_summary(self.counts, int(near[0]))}
