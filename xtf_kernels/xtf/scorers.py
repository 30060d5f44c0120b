"""The three XTF attribute scorers, computed with the frozen base model.

* :func:`reasoning_importance`: attention received per key position, from
  :func:`xtf_kernels.attention.collect_received_attention` (no [L x L] matrices).
* :func:`knowledge_novelty`: ``S_KN = 1 - p(gold)`` from :func:`xtf_kernels.masked_ce` on the
  decoder's final hidden states and the LM head as :func:`xtf_kernels.lm_head.lm_head_spec`
  describes it (bias, logit scale, softcap) with ``shift=True`` (no logits materialised).
* :class:`TaskRelevance`: ``S_TR = 1 - minmax(D(E[token], V))`` with ``V`` the mean
  input-embedding row over the dataset's response-token occurrences, accumulated as a token-id
  histogram (streamed; mergeable across ranks), D cosine (default) or euclidean distance.
* Readings (options): :func:`uniform_received_mass` for the position-debiased RI, and
  :func:`hidden_distance` for the contextual TR (distance of each occurrence's final hidden
  state to the mean response hidden state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..lm_head import lm_head_spec
from ..loss import masked_ce

__all__ = [
    "reasoning_importance",
    "decoder_hidden",
    "knowledge_novelty",
    "TaskRelevance",
    "resolve_ri_fn",
    "uniform_received_mass",
    "hidden_distance",
    "HiddenCapture",
]

RIFn = Callable[..., torch.Tensor]


def resolve_ri_fn(ri_fn: RIFn | None = None) -> RIFn:
    """The attention-received function: ``ri_fn`` or ``xtf_kernels.attention.collect_received_attention``."""
    if ri_fn is not None:
        if not callable(ri_fn):
            raise TypeError(f"ri_fn: expected a callable, got {type(ri_fn).__name__}")
        return ri_fn
    try:
        from ..attention import collect_received_attention
    except ImportError as e:
        raise ImportError(
            "reasoning importance needs xtf_kernels.attention.collect_received_attention, "
            f"which could not be imported ({e}); pass ri_fn= to use another implementation"
        ) from e
    return collect_received_attention


def _check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids: expected an int64/int32 tensor [B, L]")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected a tensor of shape {tuple(input_ids.shape)}")


def reasoning_importance(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    reduce: str = "mean_over_queries",
    ri_fn: RIFn | None = None,
) -> torch.Tensor:
    """S_RI: attention received by each position (fp32 ``[B, L]``, 0 at padding).

    Args:
        model: Hugging Face causal LM (the frozen base model).
        input_ids: int ``[B, L]``; attention_mask: ``[B, L]`` (1 = token, 0 = padding).
        layers: layer subset (None: all layers).
        reduce: ``"mean_over_queries"`` (default: averaged over the queries that see the key),
            ``"debiased"`` (summed mass / :func:`uniform_received_mass`) or another mode of the
            attention module (e.g. ``"sum"``, the raw summed mass).
        ri_fn: override of ``collect_received_attention`` (same signature).
    """
    _check_batch(input_ids, attention_mask)
    fn = resolve_ri_fn(ri_fn)
    debiased = reduce == "debiased"
    ri = fn(model, input_ids, attention_mask, layers=layers, reduce="sum" if debiased else reduce)
    if not isinstance(ri, torch.Tensor) or tuple(ri.shape) != tuple(input_ids.shape):
        raise ValueError(f"ri_fn: expected a tensor of shape {tuple(input_ids.shape)}, got {getattr(ri, 'shape', ri)!r}")
    if debiased:
        u = uniform_received_mass(attention_mask.to(ri.device))
        return torch.where(u > 0, ri.float() / u.clamp_min(1e-30), torch.zeros_like(u))
    return ri.float()


def uniform_received_mass(attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention mass key ``j`` would receive if every query attended uniformly to what it sees.

    Causal attention, padding excluded (left or right): query ``i`` sees ``n(i)`` real keys
    ``<= i``, so key ``j`` receives ``sum_{real i >= j} 1 / n(i)``. For a sequence starting at
    position 0 that is ``sum_{i >= j} 1 / (i + 1)``. The debiased RI is the summed received
    mass divided by this (1 = as much as uniform attention gives; the decay along the sequence
    cancels). One row is one document.

    Args:
        attention_mask: ``[B, L]`` bool or 0/1 (1 = real token).

    Returns:
        fp64 ``[B, L]`` (0 at padding).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask: expected a [B, L] tensor")
    v = attention_mask.to(torch.float64)
    n = torch.cumsum(v, dim=1)
    inv = torch.where(v > 0, 1.0 / n.clamp_min(1.0), torch.zeros_like(v))
    tail = torch.flip(torch.cumsum(torch.flip(inv, [1]), dim=1), [1])
    return tail * v


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states ``[B, L, D]`` from the decoder, without the LM head."""
    _check_batch(input_ids, attention_mask)
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        raise ValueError("model: expected a causal LM with a decoder (get_decoder()) and an LM head")
    out = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def knowledge_novelty(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    backend: str = "auto",
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """S_KN = 1 - p(gold) under teacher forcing, plus log-prob and entropy, label-aligned.

    Args:
        model: causal LM; input_ids / attention_mask: ``[B, L]``.
        hidden: final hidden states ``[B, L, D]`` if already computed (else the decoder is run).
        ref_logprobs: fp32 ``[B, L]`` reference-model log-probs (gives ``logprob_delta``).
        backend: masked_ce backend.
        position_ids: ``[B, L]`` of packed rows (pass ``hidden`` computed with them): a
            document's first token is not predicted from the previous document (NaN).

    Returns:
        dict of fp32 ``[B, L]`` tensors ``kn``, ``logprob``, ``entropy`` (and ``logprob_delta``
        with ``ref_logprobs``); NaN at position 0 and at padding.
    """
    _check_batch(input_ids, attention_mask)
    if hidden is None:
        hidden = decoder_hidden(model, input_ids, attention_mask)
    spec = lm_head_spec(model)
    h, w, b = spec.operands(hidden)
    labels = input_ids.long().masked_fill(attention_mask == 0, -100)
    _, stats = masked_ce(
        h, w, labels, bias=b, shift=True, reduction="sum", softcap=spec.softcap,
        ref_logprobs=ref_logprobs, return_stats=True, backend=backend, position_ids=position_ids,
    )
    out = {"kn": 1.0 - stats.prob.float(), "logprob": stats.logprob.float(), "entropy": stats.entropy.float()}
    if stats.logprob_delta is not None:
        out["logprob_delta"] = stats.logprob_delta.float()
    return out


class TaskRelevance:
    """Dataset-level task relevance from a token-occurrence histogram over the vocabulary.

    ``add(token_ids)`` streams response tokens; ``merge``/``counts`` can be summed across
    ranks. :meth:`finalize` computes the domain vector ``V`` (mean input-embedding row over the
    occurrences, or over ``domain_token_ids``), the distance of every vocabulary row to V, the
    min/max over the tokens that occur in the dataset's responses and ``S_TR`` per token id.

    Args:
        vocab_size: rows of the input embedding.
        metric: ``"cosine"`` (default) or ``"euclidean"``.
    """

    def __init__(self, vocab_size: int, metric: str = "cosine") -> None:
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric: expected 'cosine' or 'euclidean', got {metric!r}")
        self.vocab_size = vocab_size
        self.metric = metric
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.tr: np.ndarray | None = None
        self.info: dict[str, Any] = {}

    def add(self, token_ids: np.ndarray) -> None:
        """Count response-token occurrences (int ``[N]`` ids in [0, vocab_size))."""
        ids = np.asarray(token_ids).reshape(-1).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token_ids: expected ids in [0, {self.vocab_size})")
        self.counts += np.bincount(ids, minlength=self.vocab_size)

    @torch.no_grad()
    def finalize(
        self,
        embedding: torch.Tensor,
        domain_token_ids: Sequence[int] | None = None,
        chunk_rows: int = 8192,
    ) -> np.ndarray:
        """Compute ``S_TR`` per vocabulary id (float64 ``[V]``; NaN for ids absent from responses).

        Args:
            embedding: input-embedding weight ``[V', D]`` with ``V' >= vocab_size``.
            domain_token_ids: optional user-given domain words (token ids): V = their mean row.
            chunk_rows: rows per distance chunk (memory bound).
        """
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2 or embedding.shape[0] < self.vocab_size:
            raise ValueError(f"embedding: expected a [>= {self.vocab_size}, D] tensor")
        E = embedding[: self.vocab_size]
        present = self.counts > 0
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("no response tokens were counted: cannot compute the domain vector")
        dev = E.device
        if domain_token_ids is not None:
            ids = torch.as_tensor(list(domain_token_ids), dtype=torch.long, device=dev)
            if ids.numel() == 0:
                raise ValueError("domain_token_ids: expected at least one token id")
            V = E.index_select(0, ids).double().mean(0)
        else:
            V = torch.zeros(E.shape[1], dtype=torch.float64, device=dev)
            c = torch.from_numpy(self.counts).to(dev)
            for s in range(0, self.vocab_size, chunk_rows):
                V += (E[s : s + chunk_rows].double() * c[s : s + chunk_rows, None].double()).sum(0)
            V /= total
        dist = np.empty(self.vocab_size, dtype=np.float64)
        for s in range(0, self.vocab_size, chunk_rows):
            e = E[s : s + chunk_rows].double()
            if self.metric == "cosine":
                d = 1.0 - torch.nn.functional.cosine_similarity(e, V[None, :], dim=1, eps=1e-12)
            else:
                d = (e - V[None, :]).norm(dim=1)
            dist[s : s + chunk_rows] = d.cpu().numpy()
        dmin, dmax = float(dist[present].min()), float(dist[present].max())
        tr = np.full(self.vocab_size, np.nan)
        if dmax > dmin:
            tr[present] = 1.0 - (dist[present] - dmin) / (dmax - dmin)
        else:
            tr[present] = 1.0
        self.tr = tr
        self.info = {
            "metric": self.metric,
            "distance_min": dmin,
            "distance_max": dmax,
            "domain": "words" if domain_token_ids is not None else "response_tokens",
            "distinct_tokens": int(present.sum()),
            "occurrences": total,
        }
        return tr


@torch.no_grad()
def hidden_distance(hidden: torch.Tensor, domain: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Distance of every position's hidden state to the domain vector (contextual TR).

    Args:
        hidden: ``[B, L, D]`` final hidden states.
        domain: ``[D]`` domain vector (mean response hidden state over the dataset).
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        fp64 ``[B, L]`` distances.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric: expected 'cosine' or 'euclidean', got {metric!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or domain.shape != hidden.shape[-1:]:
        raise ValueError(f"hidden, domain: expected [B, L, D] and [D], got {tuple(hidden.shape)}, {tuple(domain.shape)}")
    h = hidden.double()
    v = domain.to(h.device, torch.float64)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(h, v.expand_as(h), dim=-1, eps=1e-12)
    return (h - v).norm(dim=-1)


class HiddenCapture:
    """Forward hook on the decoder: keeps the final hidden states of the last forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.value: torch.Tensor | None = None
        dec = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.handle = dec.register_forward_hook(self._hook) if dec is not None and dec is not model else None

    def _hook(self, module, args, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
