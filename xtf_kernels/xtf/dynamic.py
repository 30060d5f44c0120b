"""On-the-fly token filtering: a ``select=`` policy scored with the model being trained.

:class:`DynamicXTF` is called by :func:`xtf_kernels.masked_ce` inside its forward, with the
:class:`~xtf_kernels.TokenStats` of every scored token of the micro-batch, and returns the
keep mask. The statistics come from the same sweep over the vocabulary that computes the
loss, so dynamic filtering costs no extra logits GEMM. Rules (a token is masked when ANY
enabled rule fires, the union of XTF):

* ``kn``: knowledge novelty (XTF Eq. 6) with the *current* model: mask when
  ``1 - prob < kn_threshold`` (default 0.05, i.e. prob > 0.95: already learnt).
* ``entropy``: mask when the predictive entropy (nats) is below ``entropy_min`` (a confident
  prediction carries little signal; the "keep the highest-entropy tokens" policy).
* ``excess_loss``: Rho-1 / SLM style, from reference log-probs stored with the data
  (``ref_logprobs`` / the batch's ``xtf_ref_logprobs``): excess loss = current loss minus
  reference loss = ``-stats.logprob_delta``. Mask when it is below ``excess_loss_min``, or
  keep only the top ``excess_loss_keep_ratio`` fraction of the micro-batch's scored tokens.

Per-rule masked fractions (over the tokens that were candidates, i.e. not ignored and not
already masked by ``keep``) are accumulated per optimizer step without host syncs;
:meth:`DynamicXTF.end_step` closes a step and :class:`DynamicXTFCallback` does that and puts
the fractions in the ``transformers.Trainer`` logs (``xtf/masked_kn`` etc.).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..stats import TokenStats

RULES = ("kn", "entropy", "excess_loss")


class DynamicXTF:
    """A ``select=`` policy applying XTF-style rules with the model being trained.

    Args:
        kn_threshold: mask when ``1 - prob < kn_threshold``; None disables the rule.
        entropy_min: mask when ``entropy < entropy_min`` (nats); None disables the rule.
        excess_loss_min: mask when ``-(logprob - ref_logprob) < excess_loss_min``.
        excess_loss_keep_ratio: in ``(0, 1]``: keep the top fraction of scored tokens by
            excess loss (per micro-batch); exclusive with ``excess_loss_min``.
        kn_cap: in ``[0, 1]``: the released implementation's per-sequence KN cap (its default
            0.10): a token is masked only when also ``prob > sorted_prob[int(n * (1 - kn_cap))]``
            among the ``n`` candidate tokens of its row (labels ``[B, L]``: each row is a
            sequence; 1-D labels: one sequence). None (default): uncapped.
        history: keep per-step records in :attr:`history` (list of dicts).

    The excess-loss rule needs reference log-probs: pass ``ref_logprobs`` to ``masked_ce`` (or
    the ``xtf_ref_logprobs`` batch field to a model patched by ``apply_xtf``); a call without
    them raises ValueError.

    Example::

        policy = DynamicXTF(kn_threshold=0.05, entropy_min=0.5)
        loss = masked_ce(h, w, labels, shift=True, select=policy)
        policy.end_step()            # once per optimizer step
        policy.history[-1]           # {"kn": 0.12, "entropy": 0.08, "any": 0.17, "tokens": 812}
    """

    def __init__(
        self,
        *,
        kn_threshold: float | None = 0.05,
        entropy_min: float | None = None,
        excess_loss_min: float | None = None,
        excess_loss_keep_ratio: float | None = None,
        kn_cap: float | None = None,
        history: bool = True,
    ) -> None:
        def _num(name: str, v: Any) -> float | None:
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise TypeError(f"{name}: expected a finite float or None, got {v!r}")
            return float(v)

        self.kn_threshold = _num("kn_threshold", kn_threshold)
        self.entropy_min = _num("entropy_min", entropy_min)
        self.excess_loss_min = _num("excess_loss_min", excess_loss_min)
        self.excess_loss_keep_ratio = _num("excess_loss_keep_ratio", excess_loss_keep_ratio)
        self.kn_cap = _num("kn_cap", kn_cap)
        if self.kn_cap is not None and not 0.0 <= self.kn_cap <= 1.0:
            raise ValueError(f"kn_cap: expected a value in [0, 1], got {kn_cap}")
        if self.kn_cap is not None and self.kn_threshold is None:
            raise ValueError("kn_cap: caps the KN rule, which kn_threshold=None disables")
        if self.kn_threshold is not None and not 0.0 <= self.kn_threshold <= 1.0:
            raise ValueError(f"kn_threshold: expected a value in [0, 1], got {kn_threshold}")
        if self.entropy_min is not None and self.entropy_min < 0:
            raise ValueError(f"entropy_min: expected >= 0 nats, got {entropy_min}")
        if self.excess_loss_keep_ratio is not None:
            if self.excess_loss_min is not None:
                raise ValueError("excess_loss_min and excess_loss_keep_ratio are exclusive; give one")
            if not 0.0 < self.excess_loss_keep_ratio <= 1.0:
                raise ValueError(
                    f"excess_loss_keep_ratio: expected a value in (0, 1], got {excess_loss_keep_ratio}"
                )
        if not isinstance(history, bool):
            raise TypeError(f"history: expected a bool, got {type(history).__name__}")
        if all(v is None for v in (self.kn_threshold, self.entropy_min, self.excess_loss_min,
                                   self.excess_loss_keep_ratio)):
            raise ValueError("DynamicXTF: expected at least one rule enabled, got none")
        self.keep_history = history
        self.history: list[dict[str, float]] = []
        self._pending: list[dict[str, float]] = []
        self._acc: dict[str, torch.Tensor] = {}
        self.calls = 0
        #: False while :meth:`paused` (evaluation): masks still apply, nothing is recorded
        self.recording = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[DynamicXTF]:
        """Context in which calls apply the rules but are not recorded (e.g. evaluation)."""
        old, self.recording = self.recording, False
        try:
            yield self
        finally:
            self.recording = old

    @property
    def rowwise(self) -> bool:
        """True when every enabled rule is a per-token threshold (see :func:`xtf_kernels.rowwise`).

        masked_ce then applies the policy chunk by chunk while the logits are in memory, so
        statistics, selection and gradient come from one logits GEMM. The rank-based
        ``excess_loss_keep_ratio`` and ``kn_cap`` need all of a sequence's tokens at once: not rowwise.
        """
        return self.excess_loss_keep_ratio is None and self.kn_cap is None

    @property
    def rules(self) -> tuple[str, ...]:
        """Names of the enabled rules."""
        out = []
        if self.kn_threshold is not None:
            out.append("kn")
        if self.entropy_min is not None:
            out.append("entropy")
        if self.excess_loss_min is not None or self.excess_loss_keep_ratio is not None:
            out.append("excess_loss")
        return tuple(out)

    def masks(self, stats: TokenStats) -> dict[str, torch.Tensor]:
        """Per-rule bool masks (True = the rule masks the token), label-aligned.

        Args:
            stats: the statistics :func:`masked_ce` passes to ``select``.

        Returns:
            ``{rule: bool tensor with stats.keep's shape}`` for the enabled rules; only
            candidate tokens (``stats.keep`` True) are ever marked.
        """
        if not isinstance(stats, TokenStats):
            raise TypeError(f"stats: expected a TokenStats, got {type(stats).__name__}")
        cand = stats.keep
        out: dict[str, torch.Tensor] = {}
        if self.kn_threshold is not None:
            out["kn"] = cand & ((1.0 - stats.prob) < self.kn_threshold)
            if self.kn_cap is not None:
                out["kn"] &= _above_capped_quantile(stats.prob, cand, self.kn_cap)
        if self.entropy_min is not None:
            out["entropy"] = cand & (stats.entropy < self.entropy_min)
        if self.excess_loss_min is not None or self.excess_loss_keep_ratio is not None:
            if stats.logprob_delta is None:
                raise ValueError(
                    "DynamicXTF excess-loss rule: expected reference log-probs (masked_ce "
                    "ref_logprobs=, or the batch field xtf_ref_logprobs with apply_xtf), got none"
                )
            excess = -stats.logprob_delta
            if self.excess_loss_min is not None:
                out["excess_loss"] = cand & (excess < self.excess_loss_min)
            else:
                n = int(cand.sum())
                n_keep = int(math.ceil(self.excess_loss_keep_ratio * n))  # type: ignore[operator]
                drop = torch.zeros_like(cand)
                if n_keep < n:
                    vals = torch.where(cand, excess, torch.full_like(excess, float("inf")))
                    flat = vals.reshape(-1)
                    # the n - n_keep lowest-excess candidates are masked (stable, ties by position)
                    order = torch.sort(flat, stable=True).indices[: n - n_keep]
                    drop.view(-1)[order] = True
                out["excess_loss"] = cand & drop
        return out

    def __call__(self, stats: TokenStats) -> torch.Tensor:
        """The keep mask (True = train on the token); records the step statistics."""
        masks = self.masks(stats)
        cand = stats.keep
        masked = torch.zeros_like(cand)
        for m in masks.values():
            masked |= m
        self.calls += 1
        if not self.recording:
            return ~masked
        acc = self._acc
        dev = cand.device
        counts = {"tokens": cand.sum(), "any": masked.sum(), **{k: m.sum() for k, m in masks.items()}}
        for k, v in counts.items():
            v = v.to(device=dev, dtype=torch.int64)
            acc[k] = acc[k] + v if k in acc else v
        return ~masked

    def end_step(self) -> dict[str, float]:
        """Close the current optimizer step; returns ``{rule: masked fraction, "any", "tokens"}``.

        Fractions are over the step's candidate tokens on this process (0.0 when none).
        Resets the accumulators; appends to :attr:`history` when enabled.
        """
        acc, self._acc = self._acc, {}
        if not acc:
            rec = {k: 0.0 for k in (*self.rules, "any")}
            rec["tokens"] = 0.0
        else:
            n = float(acc["tokens"])
            rec = {k: (float(acc[k]) / n if n else 0.0) for k in (*self.rules, "any")}
            rec["tokens"] = n
        if self.keep_history:
            self.history.append(rec)
        self._pending.append(rec)
        return rec

    def step_summary(self) -> dict[str, float]:
        """Token-weighted masked fractions over the steps closed since the last call (for logs)."""
        pend, self._pending = self._pending, []
        tot = sum(r["tokens"] for r in pend)
        out: dict[str, float] = {}
        for k in (*self.rules, "any"):
            num = sum(r[k] * r["tokens"] for r in pend)
            out[f"xtf/masked_{k}"] = num / tot if tot else 0.0
        return out


def _above_capped_quantile(prob: torch.Tensor, cand: torch.Tensor, cap: float) -> torch.Tensor:
    """Per row (the last axis; 1-D: one row): ``prob > sorted_prob[int(n * (1 - cap))]`` over the
    row's ``n`` candidates (bool, ``prob``'s shape; False where no candidate)."""
    p = prob.double().reshape(-1, prob.shape[-1]) if prob.dim() > 0 else prob.double().reshape(1, 1)
    c = cand.reshape(p.shape)
    srt = torch.sort(torch.where(c, p, torch.full_like(p, float("inf"))), dim=-1).values
    n = c.sum(-1)
    k = torch.floor(n.double() * (1.0 - cap)).long().clamp(max=(n - 1).clamp(min=0))
    kth = srt.gather(-1, k[:, None])
    return ((p > kth) & c).reshape(prob.shape)


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback

        return TrainerCallback
    except ImportError:  # pragma: no cover - transformers is optional
        return object


class DynamicXTFCallback(_callback_base()):  # type: ignore[misc]
    """``transformers.TrainerCallback`` that closes :class:`DynamicXTF` steps and logs them.

    ``on_step_end`` calls ``policy.end_step()`` (so with gradient accumulation a "step" is an
    optimizer step); ``on_log`` adds ``xtf/masked_<rule>`` and ``xtf/masked_any`` (masked
    fractions over the steps since the previous log) to the logs dict and to the entry the
    Trainer just appended to ``state.log_history``.

    Args:
        policy: the :class:`DynamicXTF` passed as ``select`` to ``apply_xtf``.
    """

    def __init__(self, policy: DynamicXTF) -> None:
        if not isinstance(policy, DynamicXTF):
            raise TypeError(f"policy: expected a DynamicXTF, got {type(policy).__name__}")
        self.policy = policy

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.policy.end_step()
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> Any:
        if logs is None or "loss" not in logs:  # training logs only (not eval / final summary)
            return control
        summary = self.policy.step_summary()
        logs.update(summary)
        hist = getattr(state, "log_history", None)
        if hist and hist[-1].get("step") == state.global_step and "loss" in hist[-1]:
            hist[-1].update(summary)
        return control


__all__ = ["RULES", "DynamicXTF", "DynamicXTFCallback"]
