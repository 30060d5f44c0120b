"""The paper's token-level baselines as selection policies over the same per-token statistics.

Each policy turns a per-token score into a keep mask that keeps the top ``ratio`` fraction of
the scored tokens (ties broken by position, so the result is deterministic). A policy object is
callable on :class:`~xtf_kernels.TokenStats`, so it plugs straight into
``masked_ce(..., select=policy)`` during training, and :meth:`SelectionPolicy.keep_mask` works
on NumPy columns of a scored table (what ``xtf export --policy`` uses).

* :class:`SLMPolicy` (Rho-1, selective language modelling): excess loss of the current model
  over a reference model, ``loss_cur - loss_ref = -(logprob - ref_logprob) = -logprob_delta``;
  keep the highest.
* :class:`TokenCleaningPolicy` (Pang et al. 2025): influence = the loss reduction from the
  base model to the clean reference, ``loss_base - loss_ref = ref_logprob - logprob_base =
  -logprob_delta`` (run ``masked_ce`` on the base model with the reference model's log-probs
  as ``ref_logprobs``); keep the highest.
* :class:`RandomPolicy`: uniformly random tokens at the given (e.g. XTF-matched) ratio.
* :class:`EntropyPolicy`: keep the highest-entropy tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from ..stats import TokenStats

__all__ = [
    "SelectionPolicy",
    "SLMPolicy",
    "TokenCleaningPolicy",
    "RandomPolicy",
    "EntropyPolicy",
    "POLICIES",
    "make_policy",
    "keep_top_fraction",
    "matched_ratio",
]


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio: expected a number in [0, 1], got {ratio!r}")
    return float(ratio)


def keep_top_fraction(scores, valid, ratio: float):
    """Keep the ``round(ratio * n)`` highest-scoring of the ``n`` valid, non-NaN tokens.

    Args:
        scores: float tensor or ndarray of any shape.
        valid: bool tensor/ndarray of the same shape (tokens eligible for training).
        ratio: fraction in [0, 1] to keep.

    Returns:
        bool mask of the same type and shape; ties go to the earlier (flattened) position.
    """
    ratio = _check_ratio(ratio)
    is_t = isinstance(scores, torch.Tensor)
    s = scores.detach().cpu().double().numpy() if is_t else np.asarray(scores, dtype=np.float64)
    v = valid.detach().cpu().numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)
    if v.dtype != bool:
        raise TypeError(f"valid: expected a bool mask, got dtype {v.dtype}")
    if s.shape != v.shape:
        raise ValueError(f"valid: expected shape {s.shape} like scores, got {v.shape}")
    flat_s = s.reshape(-1)
    elig = np.flatnonzero(v.reshape(-1) & ~np.isnan(flat_s))
    k = int(round(ratio * elig.size))
    keep = np.zeros(flat_s.shape, dtype=bool)
    if k > 0:
        order = np.argsort(-flat_s[elig], kind="stable")
        keep[elig[order[:k]]] = True
    keep = keep.reshape(s.shape)
    if is_t:
        return torch.from_numpy(keep).to(scores.device)
    return keep


class SelectionPolicy:
    """Base class: keep the top ``ratio`` of tokens by :meth:`score`.

    Args:
        ratio: fraction of eligible tokens to keep, in [0, 1].
    """

    name = "base"
    #: TokenStats / table fields the score needs
    needs: tuple[str, ...] = ()

    def __init__(self, ratio: float) -> None:
        self.ratio = _check_ratio(ratio)

    def score(self, stats: TokenStats) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-token score (higher = more worth training on), labels' shape, NaN = not scored."""
        raise NotImplementedError

    def score_columns(self, cols: dict[str, np.ndarray]) -> np.ndarray:  # pragma: no cover
        """The same score from NumPy columns (``logprob``, ``ref_logprob``, ``entropy``)."""
        raise NotImplementedError

    def __call__(self, stats: TokenStats) -> torch.Tensor:
        """``select=`` callable for :func:`~xtf_kernels.masked_ce`: bool keep mask, labels' shape."""
        if not isinstance(stats, TokenStats):
            raise TypeError(f"stats: expected TokenStats, got {type(stats).__name__}")
        return keep_top_fraction(self.score(stats), stats.keep, self.ratio)

    def keep_mask(self, cols: dict[str, np.ndarray], valid: np.ndarray) -> np.ndarray:
        """Keep mask over table rows; ``valid`` marks the response tokens (bool ``[N]``)."""
        for f in self.needs:
            if f not in cols or cols[f] is None:
                raise ValueError(f"cols: policy {self.name!r} needs column {f!r}")
        return keep_top_fraction(self.score_columns(cols), np.asarray(valid, dtype=bool), self.ratio)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


class SLMPolicy(SelectionPolicy):
    """Rho-1 / SLM: excess loss ``loss_cur - loss_ref = -logprob_delta`` (needs ``ref_logprobs``)."""

    name = "slm"
    needs = ("logprob", "ref_logprob")

    def score(self, stats: TokenStats) -> torch.Tensor:
        if stats.logprob_delta is None:
            raise ValueError("stats: SLMPolicy needs logprob_delta (pass ref_logprobs to masked_ce)")
        return -stats.logprob_delta

    def score_columns(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(cols["ref_logprob"], np.float64) - np.asarray(cols["logprob"], np.float64)


class TokenCleaningPolicy(SelectionPolicy):
    """Token Cleaning (Pang et al., ICML 2025), fixed reference: keep the top ``ratio`` by influence.

    Influence of the model update on a token = its loss reduction from the base model to the
    reference model trained on clean data: ``loss_base - loss_ref = ref_logprob - logprob``
    (the statistics come from the *base* model with the reference's ``ref_logprobs``), i.e.
    ``-logprob_delta``. Tokens the clean reference learned are kept. Note: the project's method
    summary words it "reference minus base loss"; we follow the Token Cleaning paper's
    definition (influence = loss reduction), as the demo does. Unlike :class:`SLMPolicy`, which
    scores with the model being trained, the scores here are fixed by the base model.
    """

    name = "token_cleaning"
    needs = ("logprob", "ref_logprob")

    def score(self, stats: TokenStats) -> torch.Tensor:
        if stats.logprob_delta is None:
            raise ValueError("stats: TokenCleaningPolicy needs logprob_delta (pass ref_logprobs)")
        return -stats.logprob_delta

    def score_columns(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(cols["ref_logprob"], np.float64) - np.asarray(cols["logprob"], np.float64)


class RandomPolicy(SelectionPolicy):
    """Uniformly random tokens, exactly ``round(ratio * n)`` of them, seeded.

    Args:
        ratio: fraction to keep (use :func:`matched_ratio` to match an XTF run).
        seed: RNG seed.
    """

    name = "random"

    def __init__(self, ratio: float, seed: int = 0) -> None:
        super().__init__(ratio)
        if not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.seed = seed

    def _rand(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng(self.seed).random(shape)

    def score(self, stats: TokenStats) -> torch.Tensor:
        r = torch.from_numpy(self._rand(tuple(stats.keep.shape))).to(stats.keep.device)
        return torch.where(stats.keep, r, torch.full_like(r, float("nan")))

    def score_columns(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(cols.values())))
        return self._rand((n,))


class EntropyPolicy(SelectionPolicy):
    """Keep the tokens where the model's predictive entropy is highest."""

    name = "entropy"
    needs = ("entropy",)

    def score(self, stats: TokenStats) -> torch.Tensor:
        return stats.entropy

    def score_columns(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(cols["entropy"], np.float64)


POLICIES: dict[str, type[SelectionPolicy]] = {
    p.name: p for p in (SLMPolicy, TokenCleaningPolicy, RandomPolicy, EntropyPolicy)
}


def make_policy(name: str, ratio: float, **kwargs) -> SelectionPolicy:
    """Policy by name: one of ``"slm"``, ``"token_cleaning"``, ``"random"``, ``"entropy"``."""
    if name not in POLICIES:
        raise ValueError(f"name: expected one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](ratio, **kwargs)


def matched_ratio(summary: dict) -> float:
    """Kept fraction of response tokens in an XTF ``summary.json`` dict (for matched baselines)."""
    try:
        resp = int(summary["tokens"]["response"])
        kept = int(summary["tokens"]["kept"])
    except (KeyError, TypeError) as e:
        raise ValueError("summary: expected an XTF summary with tokens.response and tokens.kept") from e
    return kept / resp if resp else 0.0
