"""The contract between the masked-CE front end and the backends.

The front end (:mod:`xtf_kernels.loss`) does everything that is the same for all backends:
validation, flattening, the causal shift, ignore/keep/select handling, row compaction, the
loss formula, reductions, scattering statistics back. A backend only sees *compacted* 2-D
problems whose rows are all valid (labels in ``[0, V)``) and answers three calls:

``forward(x, w, b, y, cfg, n_grad) -> ForwardOut``
    One sweep over the vocabulary for every row of ``x``: per-row fp32 statistics
    (:class:`RowStats`: ``row_max``, and relative to it ``lse``, ``gold`` logit, ``entropy``,
    ``sum_logits``) and, when ``n_grad > 0``, the gradient of ``sum_i loss_i`` over the first
    ``n_grad`` rows (unit upstream gradient): ``dx`` ``[n_grad, D]`` in ``x.dtype``, ``dw``
    ``[V, D]`` and ``db`` ``[V]`` (or None without bias). The Liger-style "gradient during the
    forward": three GEMMs per kept row in total. Rows past ``n_grad`` are scored only.

``backward(x, w, b, y, row_max, lse, row_scale, cfg) -> GradOut``
    Recompute the logits of the given rows (``row_max`` and ``lse`` as the forward returned
    them) and return the gradient of ``sum_i row_scale[i] * loss_i``. Used when the keep mask
    is only known after the statistics (``select``) or the upstream gradient is per token
    (``reduction="none"``).

``forward_rowwise(x, w, b, y, cfg, row_select) -> (ForwardOut, sel)``
    Like ``forward`` but the gradient rows are chosen chunk by chunk by ``row_select(start,
    end, row_max, lse, gold, entropy) -> bool [end - start]`` (a :data:`RowSelect`) while the
    chunk's logits are in memory. ``dx`` holds the selected rows in row order; ``sel`` is bool
    ``[M]``. :class:`BackendBase` has a default on top of the other two.

The bundled backends implement all three once, in :mod:`.driver` (the chunk plan, vocabulary
blocks, compaction, gradient-in-forward vs recompute, the rowwise selection, the dX / dW
accumulation), and supply only per-row primitives (``row_stats``, ``row_grad_``, optionally
fused forms): see :class:`.driver.DriverBackend`.

The front end checks every argument once (:mod:`xtf_kernels.loss.validate`) and hands
over consistent tensors: ``x`` ``[M, D]`` and ``w`` ``[V, D]`` of one float dtype with
``V, D >= 1``, ``b`` ``[V]`` of that dtype or None, ``y`` ``[M]`` int64 in ``[0, V)``, all on
one device, ``0 <= n_grad <= M``. Backends do not check them again.

Per-row math (z = logits after the optional softcap ``c * tanh(raw / c)``)::

    row_max = max_v z_v                                  (m below)
    lse     = logsumexp_v (z_v - m)                      (the log-sum-exp is m + lse)
    gold    = z_y - m
    sum_logits = sum_v (z_v - m)
    entropy = lse - sum_v softmax(z)_v (z_v - m)         (0 log 0 = 0 for -inf logits)
    loss    = lse - (1 - ls) * gold - ls * sum_logits / V + zl * (m + lse)**2
    dloss/dz_v = softmax_v * (1 + 2 zl (m + lse)) - (1 - ls) [v == y] - ls / V,
                 softmax_v = exp(z_v - m - lse)
    dloss/draw_v = dloss/dz_v * (1 - (z_v / c)**2)            (softcap only)

Every statistic is relative to the row maximum so that a large common offset of the logits
(a bias of 1e6, say) costs no precision: the loss and ``logprob = gold - lse`` never subtract
two full-magnitude fp32 numbers. The softcap is evaluated without the cancellation of
``1 - 2 / (exp(2t) + 1)`` at small ``t``.

Half-precision inputs: on CUDA the GEMMs take ``x.dtype`` operands with fp32 accumulation;
with an epilogue (``bias`` or ``softcap``) the logits stay fp32 from the GEMM accumulator
through it (cuBLAS' fp32-output GEMM; the Triton backend everywhere). On the CPU the native
and torch backends upcast the operands once per call and run every GEMM in fp32
(:func:`cpu_fp32_call`: fp32 logits, as the peers' accuracy criterion needs; ATen has no
fp32-output half GEMM on the CPU, and on AVX2 the bf16 GEMM is several times slower than the
fp32 one); ``XTF_CPU_HALF_GEMM=half`` keeps the half GEMMs (``docs/numerics.md``).

All accumulation (lse, statistics, dW, db) is fp32 whatever the input dtype. A backend may
hand ``dw`` back already cast to ``w.dtype`` when every partial sum of it was accumulated in
fp32 before that single rounding (e.g. a vocabulary-blocked backward that forms each block
of dW in one GEMM over all rows); the front end casts whatever it gets to ``w.dtype``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from .._env import cpu_half_gemm
from ..config import DEFAULT_CHUNK_ELEMS
from ._plan import rows_per_chunk, spans

#: ``row_select(start, end, row_max, lse, gold, entropy) -> bool [end - start]``: the gradient
#: rows of one chunk of a rowwise forward (statistics fp32 ``[end - start]``, relative to row_max);
#: backends call it through :func:`select_rows`
RowSelect = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RowStats(NamedTuple):
    """Per-row statistics, every one but ``row_max`` relative to ``row_max`` (module doc).

    Each field is fp32 (fp64 for fp64 inputs) ``[M]`` (or ``[N]`` at label positions, NaN where
    not scored). The one named form of the statistics between the backends and
    :mod:`xtf_kernels.loss`: a kernel's packed ``[5, M]`` buffer (rows in this field order)
    stays inside its backend and crosses as ``RowStats(*buf.unbind(0))``.
    """

    row_max: torch.Tensor  #: max_v z_v (after the softcap)
    lse: torch.Tensor  #: logsumexp_v (z_v - row_max)
    gold: torch.Tensor  #: z_y - row_max
    entropy: torch.Tensor  #: of softmax(z)
    sum_logits: torch.Tensor  #: sum_v (z_v - row_max)

    @classmethod
    def empty(cls, n: int, *, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> RowStats:
        """Five uninitialised ``[n]`` tensors."""
        return cls(*(torch.empty(n, dtype=dtype, device=device) for _ in cls._fields))

    def rows(self, start: int, end: int) -> RowStats:
        """Views of rows ``[start, end)``."""
        return RowStats(*(f[start:end] for f in self))

    def put(self, start: int, end: int, src: RowStats) -> None:
        """Write ``src`` into rows ``[start, end)``."""
        for dst, val in zip(self, src):
            dst[start:end] = val


def select_rows(row_select: RowSelect, start: int, end: int, st: RowStats) -> torch.Tensor:
    """``row_select`` on the statistics ``st`` of rows ``[start, end)``: bool ``[end - start]``."""
    return row_select(start, end, st.row_max, st.lse, st.gold, st.entropy)


@dataclass(frozen=True)
class CEConfig:
    """Options of one masked-CE call that the backends need."""

    softcap: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    #: target number of fp32 logits elements held at once (rows x vocab); backends size
    #: their row chunks / vocab blocks from it (one default: the options')
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    #: gradient filtering, resolved: (threshold, max skipped mass per row or None), or None
    #: (exact); see :mod:`xtf_kernels.grad_filter`
    grad_filter: tuple[float, float | None] | None = None


class ForwardOut(NamedTuple):
    row_max: torch.Tensor  # [M] fp32 max_v z_v (after softcap); lse, gold, sum_logits are relative to it
    lse: torch.Tensor  # [M] fp32 logsumexp(z - row_max)
    gold: torch.Tensor  # [M] fp32 z_y - row_max
    entropy: torch.Tensor  # [M] fp32
    sum_logits: torch.Tensor  # [M] fp32 sum_v (z_v - row_max)
    dx: torch.Tensor | None  # [n_grad, D] x.dtype
    dw: torch.Tensor | None  # [V, D] fp32 (or w.dtype once accumulated in fp32)
    db: torch.Tensor | None  # [V] fp32
    #: [n_grad] fp32 |gradient-logit| mass the filter skipped per gradient row (None: exact)
    skipped: torch.Tensor | None = None

    @classmethod
    def of(cls, stats: RowStats, dx: torch.Tensor | None = None, dw: torch.Tensor | None = None,
           db: torch.Tensor | None = None, skipped: torch.Tensor | None = None) -> ForwardOut:
        """The forward output of ``stats`` and the gradient (None without one)."""
        return cls(*stats, dx, dw, db, skipped)

    @property
    def stats(self) -> RowStats:
        """The five statistics, named."""
        return RowStats(self.row_max, self.lse, self.gold, self.entropy, self.sum_logits)


class GradOut(NamedTuple):
    dx: torch.Tensor  # [M, D] x.dtype
    dw: torch.Tensor  # [V, D] fp32 (or w.dtype once accumulated in fp32)
    db: torch.Tensor | None  # [V] fp32


class BackendBase:
    """The contract (see the module docstring); concrete backends subclass it."""

    name: str = "?"

    def available(self) -> tuple[bool, str]:
        """(usable here?, reason when not)."""
        raise NotImplementedError

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        """Whether this backend can run tensors of this device/dtype (reason when not)."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        y: torch.Tensor,
        cfg: CEConfig,
        n_grad: int,
    ) -> ForwardOut:
        """Statistics of every row; gradient (unit upstream) of the first ``n_grad`` rows."""
        raise NotImplementedError

    def backward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        y: torch.Tensor,
        row_max: torch.Tensor,
        lse: torch.Tensor,
        row_scale: torch.Tensor,
        cfg: CEConfig,
    ) -> GradOut:
        """Gradient of ``sum_i row_scale[i] * loss_i`` by recomputing the rows' logits."""
        raise NotImplementedError

    def forward_rowwise(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        y: torch.Tensor,
        cfg: CEConfig,
        row_select: RowSelect,
    ) -> tuple[ForwardOut, torch.Tensor]:
        """Default: statistics by ``forward``, the selection chunk by chunk, then the selected
        rows' gradient by ``backward`` (two logits GEMMs for them instead of one)."""
        M, V = x.shape[0], w.shape[0]
        fo = self.forward(x, w, b, y, cfg, 0)
        sel = torch.zeros(M, dtype=torch.bool, device=x.device)
        st = fo.stats
        for s, e in spans(M, rows_per_chunk(M, V, cfg, torch.float32)):
            sel[s:e] = select_rows(row_select, s, e, st.rows(s, e))
        idx = sel.nonzero().squeeze(1)
        ones = torch.ones(idx.numel(), dtype=st.lse.dtype, device=x.device)
        go = self.backward(x.index_select(0, idx), w, b, y.index_select(0, idx),
                           st.row_max.index_select(0, idx), st.lse.index_select(0, idx), ones, cfg)
        return fo._replace(dx=go.dx, dw=go.dw, db=go.db), sel


_HALF = (torch.bfloat16, torch.float16)
_F = TypeVar("_F", bound=Callable)


def cpu_fp32_call(method: _F) -> _F:
    """Decorator of a backend method ``(self, x, w, b, ...)``: bf16 / fp16 CPU inputs run it on
    fp32 copies of ``x``, ``w`` and ``b`` (every GEMM in fp32, fp32 logits), and its ``dx``
    comes back in ``x.dtype`` (``dw``, ``db`` stay fp32: the front end rounds them once).
    ``XTF_CPU_HALF_GEMM=half`` turns it off."""

    @functools.wraps(method)
    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *args, **kwargs):
        if (x.dtype not in _HALF or x.device.type != "cpu" or not getattr(self, "cpu_fp32", True)
                or cpu_half_gemm() == "half"):
            return method(self, x, w, b, *args, **kwargs)
        out = method(self, x.float(), w.float(), None if b is None else b.float(), *args, **kwargs)
        if isinstance(out, GradOut):
            return out._replace(dx=out.dx.to(x.dtype))
        fo, sel = out if isinstance(out, tuple) and not isinstance(out, ForwardOut) else (out, None)
        fo = fo._replace(dx=None if fo.dx is None else fo.dx.to(x.dtype))
        return fo if sel is None else (fo, sel)

    return run  # type: ignore[return-value]


#: the type the registry hands out
Backend = BackendBase
