"""What one masked_ce call is: :class:`MaskedCESpec` (its non-tensor arguments and the options
resolved for it) and :class:`MaskedCEOutputs` (what :class:`~xtf_kernels.MaskedCE` returns).

A leaf of the package: it imports only :mod:`xtf_kernels.config` and the backend contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..backends.base import CEConfig
from ..config import get_options
from ..stats import TokenStats

SelectFn = Callable[[TokenStats], torch.Tensor]

#: the :class:`MaskedCESpec` fields that travel as ``xtf_kernels::masked_ce_fwd`` arguments, in
#: its schema's order after the eight tensors (``select`` cannot live in a graph; the gradient
#: is always recomputed there, so ``grad_in_forward`` and ``stats`` do not apply)
OP_FIELDS = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "shift", "backend",
             "chunk_elems", "check_labels")
#: those of them the backward op ``masked_ce_bwd`` takes
BWD_OP_FIELDS = ("reduction", "label_smoothing", "z_loss", "softcap", "shift", "backend", "chunk_elems")


@dataclass(frozen=True)
class MaskedCESpec:
    """Non-tensor arguments of :class:`MaskedCE` (see :func:`masked_ce` for their meaning).

    ``grad_in_forward``, ``chunk_elems`` and ``check_labels`` are the
    :class:`~xtf_kernels.Options` of this call. ``None`` (the
    default when a spec is built by hand) means "whatever ``get_options()`` says when the
    forward runs": :meth:`resolved` fills them in once per call, and everything after it
    (the backward included) reads them from the spec, never from the global options.
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    shift: bool = False
    select: SelectFn | None = None
    backend: str = "auto"
    #: statistics wanted for masked (not kept) tokens too; False lets the forward skip them
    stats: bool = True
    grad_in_forward: bool | None = None
    chunk_elems: int | None = None
    check_labels: bool | None = None
    #: the vocabulary layout of a vocabulary-parallel call
    #: (:class:`~xtf_kernels.loss.vocab_parallel.VocabShard`), None on one device
    vocab_shard: Any = None

    def op_args(self) -> dict[str, Any]:
        """The fields that travel as arguments of the custom op ``masked_ce_fwd``
        (:data:`OP_FIELDS`, by name; the spec must be resolved)."""
        return {f: getattr(self, f) for f in OP_FIELDS}

    def resolved(self) -> MaskedCESpec:
        """This spec with every option field set (from :func:`~xtf_kernels.get_options`)."""
        if None not in (self.grad_in_forward, self.chunk_elems, self.check_labels):
            return self
        opts = get_options()
        return dataclasses.replace(
            self,
            grad_in_forward=opts.grad_in_forward if self.grad_in_forward is None else self.grad_in_forward,
            chunk_elems=opts.chunk_elems if self.chunk_elems is None else self.chunk_elems,
            check_labels=opts.check_labels if self.check_labels is None else self.check_labels,
        )

    def ce_config(self) -> CEConfig:
        """The part of a resolved spec that the backends need."""
        if self.chunk_elems is None:
            raise ValueError("MaskedCESpec.ce_config: resolve the options first (spec.resolved())")
        return CEConfig(
            softcap=self.softcap,
            label_smoothing=float(self.label_smoothing),
            z_loss=float(self.z_loss),
            chunk_elems=self.chunk_elems,
        )


class MaskedCEOutputs(NamedTuple):
    """The outputs of one masked_ce forward, in :class:`MaskedCE`'s order.

    ``logprob`` .. ``keep`` are detached, with the labels' shape (fp32; NaN where a token is
    not scored); ``logprob_delta`` / ``relevance`` are empty tensors when ``ref_logprobs`` /
    ``task_vector`` were not given. ``lse_parts`` ``[2, *labels.shape]`` holds each row's logit
    maximum and its log-sum-exp relative to it (what a backward recompute needs).
    """

    loss: torch.Tensor
    logprob: torch.Tensor
    prob: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    logprob_delta: torch.Tensor
    relevance: torch.Tensor
    keep: torch.Tensor
    lse_parts: torch.Tensor

    def token_stats(self, *, has_delta: bool, has_relevance: bool) -> TokenStats:
        """The public :class:`TokenStats` view of these outputs."""
        return TokenStats(
            logprob=self.logprob,
            prob=self.prob,
            entropy=self.entropy,
            lse=self.lse,
            logprob_delta=self.logprob_delta if has_delta else None,
            relevance=self.relevance if has_relevance else None,
            keep=self.keep,
        )
