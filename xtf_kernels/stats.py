"""Per-token statistics returned by :func:`xtf_kernels.masked_ce`."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Detached per-token statistics, each with the leading shape of ``labels``.

    Float fields are fp32 and hold NaN at ignored positions (label == ignore_index, or
    position 0 of a sequence with ``shift=True``); they are filled for every other token,
    kept or masked, so one pass both scores and trains.

    Attributes:
        logprob: log p(gold token).
        prob: p(gold token); the paper's knowledge-novelty score is ``1 - prob``.
        entropy: entropy (nats) of the predictive distribution, after the softcap.
        lse: log-sum-exp of the logits.
        logprob_delta: ``logprob - ref_logprobs`` when ``ref_logprobs`` was given, else None.
        relevance: cosine(hidden row that predicts the token, task_vector) when
            ``task_vector`` was given, else None.
        keep: bool, the final keep mask (input keep AND select AND not ignored).
        grad_skipped: with ``grad_filter``, the |d loss / d logit| mass (unit upstream
            gradient) the backward skipped for each kept token, NaN elsewhere; filled during
            the forward (scalar reductions) or when the backward has run (otherwise); None
            without a filter.
    """

    logprob: torch.Tensor
    prob: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    logprob_delta: torch.Tensor | None
    relevance: torch.Tensor | None
    keep: torch.Tensor
    grad_skipped: torch.Tensor | None = None
