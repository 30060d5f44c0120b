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
from ..config import Options, get_options
from ..grad_filter import as_grad_filter
from ..stats import TokenStats

SelectFn = Callable[[TokenStats], torch.Tensor]

#: the :class:`MaskedCESpec` fields that travel as ``xtf_kernels::masked_ce_fwd`` arguments, in
#: the spec's order: the op's schema is generated from them and their types (``select`` cannot
#: live in a graph; the gradient is always recomputed there, so ``grad_in_forward`` and ``stats``
#: do not apply). A new option is a typed field here, listed below; ``custom_op.py`` follows.
OP_FIELDS = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "shift", "backend",
             "chunk_elems", "check_labels", "grad_filter_threshold", "grad_filter_max_skipped")
#: those of them the backward op ``masked_ce_bwd`` takes
BWD_OP_FIELDS = ("reduction", "label_smoothing", "z_loss", "softcap", "shift", "backend", "chunk_elems",
                 "grad_filter_threshold", "grad_filter_max_skipped")

#: the :class:`MaskedCESpec` fields that are :class:`~xtf_kernels.Options` (None: not resolved)
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(Options))


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
    grad_filter: object = None
    #: the call's gradient filter as numbers (:meth:`with_grad_filter`: ``grad_filter`` resolved
    #: for the inputs' dtype; None: exact)
    grad_filter_threshold: float | None = None
    grad_filter_max_skipped: float | None = None
    #: where the gradient filter reports its skipped mass per kept token (fp32, the labels'
    #: shape, NaN elsewhere; filled by the forward or, when the gradient is recomputed, by the
    #: backward); None: not reported. Not an op argument: nothing is reported inside a graph.
    grad_skipped_out: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    #: the vocabulary layout of a vocabulary-parallel call
    #: (:class:`~xtf_kernels.loss.vocab_parallel.VocabShard`), None on one device
    vocab_shard: Any = None

    def op_args(self) -> dict[str, Any]:
        """The fields that travel as arguments of the custom op ``masked_ce_fwd``
        (:data:`OP_FIELDS`, by name; the spec must be resolved)."""
        return {f: getattr(self, f) for f in OP_FIELDS}

    def resolved(self) -> MaskedCESpec:
        """This spec with every option field (those of :class:`~xtf_kernels.Options`) set: the
        ones left None from :func:`~xtf_kernels.get_options`, read once."""
        unset = [f for f in _OPTION_FIELDS if getattr(self, f) is None]
        if not unset:
            return self
        opts = get_options()
        # (an option whose own value is None, as grad_filter's default, leaves the spec as is)
        fill = {f: getattr(opts, f) for f in unset if getattr(opts, f) is not None}
        return dataclasses.replace(self, **fill) if fill else self

    def with_grad_filter(self, dtype: torch.dtype) -> MaskedCESpec:
        """This spec with ``grad_filter`` (None, ``"auto"``, a float or a GradFilter) resolved
        to the numeric fields for inputs of ``dtype`` (unchanged when they are set already)."""
        if self.grad_filter_threshold is not None or self.grad_filter is None:
            return self
        rule = as_grad_filter(self.grad_filter).resolve(dtype)
        if rule is None:
            return self
        return dataclasses.replace(self, grad_filter_threshold=rule[0], grad_filter_max_skipped=rule[1])

    def ce_config(self) -> CEConfig:
        """The part of a resolved spec that the backends need."""
        if self.chunk_elems is None:
            raise ValueError("MaskedCESpec.ce_config: resolve the options first (spec.resolved())")
        rule = None
        if self.grad_filter_threshold is not None:
            rule = (float(self.grad_filter_threshold),
                    None if self.grad_filter_max_skipped is None else float(self.grad_filter_max_skipped))
        return CEConfig(
            softcap=self.softcap,
            label_smoothing=float(self.label_smoothing),
            z_loss=float(self.z_loss),
            chunk_elems=self.chunk_elems,
            grad_filter=rule,
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

    def token_stats(self, *, has_delta: bool, has_relevance: bool,
                    grad_skipped: torch.Tensor | None = None) -> TokenStats:
        """The public :class:`TokenStats` view of these outputs."""
        return TokenStats(
            logprob=self.logprob,
            prob=self.prob,
            entropy=self.entropy,
            lse=self.lse,
            logprob_delta=self.logprob_delta if has_delta else None,
            relevance=self.relevance if has_relevance else None,
            keep=self.keep,
            grad_skipped=grad_skipped,
        )
