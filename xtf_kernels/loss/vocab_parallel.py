"""Vocabulary-parallel masked_ce: the LM head's rows split over the ranks of a process group.

Each rank holds the rows ``[start, stop)`` of the ``[V, D]`` head (a tensor-parallel LM head:
Megatron's vocabulary-parallel cross-entropy, ``ColwiseParallel`` on ``lm_head``) and the
same hidden states and labels. The forward sweeps the local rows once with the backend's
forward (statistics only), then two all-reduces make every statistic global
(:func:`shard_stats`): one MAX of the row maxima, one SUM of a ``[4, M]`` buffer (each shard's
exponential mass, its entropy term, the gold logit from the rank that owns the label, the sum
of logits). From there the loss, the statistics and ``select`` are those of one device. The
backward recomputes the local rows' logits with the global row maximum and log-sum-exp
(``backend.backward(..., vocab_start=start, vocab=V)``): ``dW`` / ``db`` stay local and ``dX``
is all-reduced (:func:`reduce_dx`).

:class:`VocabParallel` is what a caller passes; :class:`VocabShard` is the resolved layout
(the global vocabulary checked to be tiled by the shards) that travels in the spec.
A DTensor weight sharded on dim 0 of a 1-D mesh gives its layout by itself
(:func:`unwrap_dtensors`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..backends.base import Backend, CEConfig, GradOut, RowStats

__all__ = [
    "VocabParallel",
    "VocabShard",
    "reduce_dx",
    "resolve_shard",
    "shard_grads",
    "shard_stats",
    "unwrap_dtensors",
]


def _dist():
    import torch.distributed as dist

    return dist


def _is_process_group(group: Any) -> bool:
    dist = _dist()
    return dist.is_available() and isinstance(group, dist.ProcessGroup)


@dataclass(frozen=True)
class VocabParallel:
    """This rank's share of a vocabulary-parallel LM head (``masked_ce(vocab_parallel=...)``).

    Attributes:
        start, stop: the global vocabulary ids ``[start, stop)`` of this rank's weight rows
            (``weight`` is ``[stop - start, D]``); ``0 <= start < stop``. The shards of the
            group must tile ``[0, V)``, in any rank order (checked once, by one all_gather,
            the first time this object is used).
        group: the ``torch.distributed`` process group the vocabulary is split over (None: the
            default group). Every rank of it holds the same hidden states and labels.
        vocab_size: the global vocabulary size ``V``; None: the largest ``stop`` of the group.
    """

    start: int
    stop: int
    group: Any = None
    vocab_size: int | None = None
    _shard: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("start", "stop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"vocab_parallel: {name} expected an int, got {type(v).__name__}")
        if not 0 <= self.start < self.stop:
            raise ValueError(
                f"vocab_parallel: expected 0 <= start < stop, got start={self.start}, "
                f"stop={self.stop}"
            )
        vs = self.vocab_size
        if vs is not None and (isinstance(vs, bool) or not isinstance(vs, int) or vs < self.stop):
            raise ValueError(
                f"vocab_parallel: vocab_size expected an int >= stop = {self.stop}, got {vs!r}"
            )
        if self.group is not None and not _is_process_group(self.group):
            raise TypeError(
                f"vocab_parallel: group expected a torch.distributed ProcessGroup or None "
                f"(the default group), got {type(self.group).__name__}"
            )


class VocabShard(NamedTuple):
    """A resolved vocabulary layout: this rank's ids ``[start, stop)`` of ``vocab`` over ``group``
    (``stop == start`` only for an empty DTensor shard)."""

    start: int
    stop: int
    vocab: int
    group: Any

    @property
    def width(self) -> int:
        return self.stop - self.start


def _check_initialized() -> None:
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab_parallel: needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group) over the ranks that hold the shards"
        )


def _check_tiling(spans: list[tuple[int, int]], vocab: int) -> None:
    """ValueError unless the ``[start, stop)`` spans (any order, empty ones allowed) tile ``[0, vocab)``."""
    edge = 0
    for s, e in sorted(spans):
        if s != edge:
            break
        edge = e
    else:
        if edge == vocab:
            return
    raise ValueError(
        f"vocab_parallel: the shards of the group must tile [0, {vocab}) without gap or "
        f"overlap, got (start, stop) per rank {spans}"
    )


def resolve_shard(vp: Any, weight: torch.Tensor) -> VocabShard:
    """The checked layout of ``vp`` (a :class:`VocabParallel`) for this rank's ``weight`` shard.

    The group's layout is read by one all_gather the first time ``vp`` is used and kept on it.
    """
    if not isinstance(vp, VocabParallel):
        raise TypeError(
            f"vocab_parallel: expected a xtf_kernels.VocabParallel or None, got {type(vp).__name__}"
        )
    _check_initialized()
    if (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[0] != vp.stop - vp.start
    ):
        raise ValueError(
            f"weight: expected stop - start = {vp.stop - vp.start} rows (the shard "
            f"[{vp.start}, {vp.stop}) of vocab_parallel), got shape {tuple(weight.shape)}"
        )
    if vp._shard is not None:
        return vp._shard
    dist = _dist()
    dev = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor(
        [vp.start, vp.stop, -1 if vp.vocab_size is None else vp.vocab_size], device=dev
    )
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(vp.group))]
    dist.all_gather(parts, mine, group=vp.group)
    table = [tuple(int(v) for v in p.tolist()) for p in parts]
    sizes = {t[2] for t in table}
    if len(sizes) > 1:
        raise ValueError(
            f"vocab_parallel: vocab_size differs between the ranks of the group: {sorted(sizes)}"
        )
    vocab = max(t[1] for t in table) if vp.vocab_size is None else vp.vocab_size
    _check_tiling([t[:2] for t in table], vocab)
    shard = VocabShard(vp.start, vp.stop, vocab, vp.group)
    object.__setattr__(vp, "_shard", shard)
    return shard


# ---------------------------------------------------------------------------------- DTensors
def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing that package)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


#: id(mesh) -> (mesh, {(global rows, local rows): VocabShard}); the mesh is held so its id stays its own
_DTENSOR_LAYOUTS: dict[int, tuple[Any, dict[tuple[int, int], VocabShard]]] = {}


def _dtensor_shard(weight: Any) -> VocabShard:
    """The layout of a weight DTensor sharded on dim 0 of a 1-D mesh (one all_gather of the
    local row counts per mesh and shape: torch's chunking, read rather than recomputed)."""
    from torch.distributed.tensor import Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"weight: a DTensor LM head must be sharded on dim 0 of a 1-D device mesh "
            f"(placements (Shard(0),), vocabulary-parallel), got placements {placements} "
            f"on a mesh of shape {tuple(mesh.shape)}"
        )
    local_rows = weight.to_local().shape[0]
    entry = _DTENSOR_LAYOUTS.setdefault(id(mesh), (mesh, {}))[1]
    key = (int(weight.shape[0]), int(local_rows))
    if key not in entry:
        dist = _dist()
        group = mesh.get_group()
        mine = torch.tensor([mesh.get_local_rank(), local_rows], device=weight.to_local().device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        rows = [int(n) for _, n in sorted(tuple(p.tolist()) for p in parts)]
        start = sum(rows[: mesh.get_local_rank()])
        entry[key] = VocabShard(start, start + local_rows, int(weight.shape[0]), group)
    return entry[key]


def unwrap_dtensors(hidden: Any, weight: Any, bias: Any, vocab_parallel: Any):
    """``(hidden, weight, bias, shard)``: plain local tensors and the vocabulary layout.

    A weight DTensor sharded on dim 0 gives its local rows and its layout; a replicated
    hidden DTensor its local copy; a bias DTensor sharded like the weight its local part.
    Otherwise ``vocab_parallel`` (or None: no vocabulary parallelism) decides.
    """
    if is_dtensor(weight):
        if vocab_parallel is not None:
            raise ValueError(
                "vocab_parallel: leave it None with a DTensor weight (its placement "
                "gives the shard)"
            )
        shard = _dtensor_shard(weight)
        if is_dtensor(bias):
            if (
                tuple(bias.placements) != tuple(weight.placements)
                or bias.device_mesh != weight.device_mesh
            ):
                raise ValueError(
                    f"bias: expected a DTensor sharded like weight ({tuple(weight.placements)}), "
                    f"got placements {tuple(bias.placements)}"
                )
            bias = bias.to_local()
        weight = weight.to_local()
    elif vocab_parallel is not None:
        shard = resolve_shard(vocab_parallel, weight)
    else:
        return hidden, weight, bias, None
    if is_dtensor(hidden):
        if not all(p.is_replicate() for p in hidden.placements):
            raise ValueError(
                f"hidden: expected a replicated DTensor (every rank of the vocabulary "
                f"group holds the same hidden states), got placements {tuple(hidden.placements)}"
            )
        hidden = hidden.to_local()
    return hidden, weight, bias, shard


# ------------------------------------------------------------------------------- statistics
def shard_stats(
    be: Backend,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    cfg: CEConfig,
    shard: VocabShard,
) -> RowStats:
    """The global statistics (as one device would compute them on the whole head) of the rows
    ``x`` ``[M, D]`` with global labels ``y`` ``[M]``, from this rank's rows ``w`` ``[n, D]``.

    The local sweep sees labels outside the shard clamped into it and their gold discarded;
    then one MAX and one SUM all-reduce over ``shard.group``. For shard ``r`` with maximum
    ``m_r``, ``d_r = m_r - M`` and ``e_r = exp(d_r + lse_r)`` (its mass relative to
    ``exp(M)``): ``lse = log sum e_r``, ``entropy = lse + sum e_r (H_r - d_r - lse_r) / sum e_r``
    (the mixture of the shards' softmaxes), ``gold = gold_r + d_r`` of the owner,
    ``sum_logits = sum (zs_r + n_r d_r)``. The combination runs in float64.
    """
    dist = _dist()
    M, n = x.shape[0], shard.width
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    f64 = torch.float64
    local = y - shard.start
    owner = (local >= 0) & (local < n)
    if M == 0:  # the same on every rank: no collective
        return RowStats.empty(0, device=x.device, dtype=acc)
    if n:
        st = be.forward(x, w, b, local.clamp(0, n - 1), cfg, 0).stats
        m = st.row_max.to(f64)
    else:  # an empty DTensor shard: no mass
        m = torch.full((M,), float("-inf"), dtype=f64, device=x.device)
    top = m.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=shard.group)
    parts = torch.zeros(4, M, dtype=f64, device=x.device)
    if n:
        d = m - top
        lse_r = st.lse.to(f64)
        e = torch.exp(d + lse_r)
        parts[0] = e
        parts[1] = torch.where(e > 0, e * (st.entropy.to(f64) - d - lse_r), 0.0)
        parts[2] = torch.where(owner, st.gold.to(f64) + d, 0.0)
        parts[3] = st.sum_logits.to(f64) + n * d
    dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=shard.group)
    mass, ent, gold, zsum = parts.unbind(0)
    lse = mass.log()
    return RowStats(
        row_max=top.to(acc),
        lse=lse.to(acc),
        gold=gold.to(acc),
        entropy=(lse + ent / mass).to(acc),
        sum_logits=zsum.to(acc),
    )


def reduce_dx(dx: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The sum over the group of every rank's part of ``dX`` (summed in fp32 for half dtypes)."""
    dist = _dist()
    buf = dx.float() if dx.dtype in (torch.bfloat16, torch.float16) else dx.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=shard.group)
    return buf.to(dx.dtype)


def shard_grads(
    be: Backend,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    row_max: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    cfg: CEConfig,
    shard: VocabShard,
    *,
    need_dx: bool,
    skipped_out: torch.Tensor | None = None,
) -> GradOut:
    """The backend's recompute on this rank's rows with the global ``row_max`` / ``lse``: ``dw``
    / ``db`` of the rows, and (``need_dx``) ``dx`` summed over the group (every rank calls
    it with the same ``need_dx``, as the collective needs).

    A gradient filter (``cfg.grad_filter``) runs on each shard with the call's threshold; the
    driver gives every vocabulary block its share ``width / vocab`` of the bound on the mass
    skipped per row, so the mass skipped over the whole head stays within it. With
    ``skipped_out`` (fp32 ``[M]``, every rank) the skipped mass summed over the group is
    written there (what ``TokenStats.grad_skipped`` reports).
    """
    dist = _dist()
    report = {} if skipped_out is None else {"skipped_out": torch.zeros_like(skipped_out)}
    if shard.width:
        go = be.backward(
            x, w, b, y, row_max, lse, row_scale, cfg, vocab_start=shard.start, vocab=shard.vocab, **report
        )
    else:
        go = GradOut(
            torch.zeros_like(x),
            torch.zeros_like(w),
            None if b is None else torch.zeros(0, dtype=torch.float32, device=x.device),
        )
    if need_dx:
        go = go._replace(dx=reduce_dx(go.dx, shard))
    if skipped_out is not None:  # every rank: the collective needs all of them
        dist.all_reduce(report["skipped_out"], op=dist.ReduceOp.SUM, group=shard.group)
        skipped_out.copy_(report["skipped_out"])
    return go
