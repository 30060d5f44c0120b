"""Triton kernels of the masked cross-entropy and their launchers.

Two kernels (the design is in ``docs/triton.md``):

``_stats_kernel``
    Fully fused statistics, no logits in memory. Grid ``(row blocks, vocab splits)``; each
    program loops over the vocabulary tiles of its split and, inside, over ``D`` tiles with
    ``tl.dot`` (fp32 accumulator). The epilogue adds the bias, applies the softcap and folds
    the tile into an online log-sum-exp ``(m, s)``, an online shifted entropy term
    ``t = sum exp(z - m) * (z - m)``, the gold logit and the shifted sum of logits
    ``sum (z - m)``. Each split writes its partial ``(m, s, t, gold, zsum)``;
    :func:`fused_stats` merges the splits (splits keep an H100 busy when there are few row
    blocks).

``_rows_kernel``
    One program per row (a block of rows in the interpreter) of a ``[rows, V]`` logits
    buffer produced by cuBLAS (``torch.mm``), or of a vocabulary block of it (``v_off``).
    Sweep 1 (``DO_STATS``): online statistics of the row. Sweep 2 (``DO_GRAD``): overwrite the
    row in place with ``row_scale * d(loss)/d(raw logits)``. The buffer then feeds the two
    gradient GEMMs (``dx (+)= G @ W``, ``dW (+)= G^T @ X``) done by the caller.

Every row offset is computed in int64 (:func:`row_offset`): ``rows x V`` or ``rows x D`` can
exceed 2**31 elements. All accumulation is fp32. Statistics are returned relative to the row
maximum (see :mod:`xtf_kernels.backends.base`): a large common logit offset costs no precision.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

try:  # the class the interpreter's @triton.jit returns
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - layout of other triton versions
    _Interpreted = ()


@triton.jit
def row_offset(row, stride):
    """Element offset ``row * stride`` in int64 (row indices are int32 by default)."""
    return row.to(tl.int64) * stride


@triton.jit
def _softcap(z, cap):
    """``cap * tanh(z / cap)``: ``1 - 2 / (exp(2|t|) + 1)`` for ``|t| >= 0.625``, below it (where
    that form cancels) the odd minimax polynomial of Cephes' tanhf (relative error ~1e-7)."""
    t = z / cap
    a = tl.abs(t)
    a_big = tl.where(a > 40.0, 40.0, a)  # exp(80) fits fp32; a NaN stays NaN
    big = 1.0 - 2.0 / (tl.exp(2.0 * a_big) + 1.0)
    q = a * a
    poly = (((-5.70498872745e-3 * q + 2.06390887954e-2) * q - 5.37397155531e-2) * q
            + 1.33314422036e-1) * q - 3.33332819422e-1
    small = poly * q * a + a
    th = tl.where(a < 0.625, small, big)
    return cap * tl.where(t < 0.0, -th, th)


@triton.jit
def _epilogue(z, B, cols, cmask, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """Logits ``z`` (any float dtype, ``[..., BV]`` or a gathered ``[R]``) in fp32, plus the bias
    of ``cols`` (masked by ``cmask``), then the softcap: the one epilogue of every kernel."""
    z = z.to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_CAP:
        z = _softcap(z, cap)
    return z


@triton.jit
def _fold_tile(m, s, t, zs, z, valid, n_prev):
    """Fold a ``[R, BV]`` tile of logits ``z`` (``valid``: column mask) into the running row
    statistics ``m`` (max), ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)`` and
    ``zs = sum (z - m)``; ``n_prev``: columns folded before this tile. 0 log 0 = 0."""
    zm = tl.where(valid, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(zm - m_new[:, None])
    zc = tl.where(valid, z - m_new[:, None], 0.0)
    t = alpha * (t + (m - m_new) * s) + tl.sum(tl.where(e > 0.0, e * zc, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    zs = zs + (m - m_new) * n_prev + tl.sum(zc, axis=1)
    return m_new, s, t, zs


@triton.jit
def _stats_kernel(
    X, W, B, Y, PART,
    M, V, D, VS, SM, stride_x, stride_w, cap, M_KEY,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    y = tl.load(Y + rows, mask=rmask, other=-1)
    x_row = X + row_offset(rows, stride_x)
    offs_d = tl.arange(0, BD)
    m_i = tl.full([BM], -1.0e30, tl.float32)
    s_i = tl.zeros([BM], tl.float32)
    t_i = tl.zeros([BM], tl.float32)
    g_i = tl.zeros([BM], tl.float32)
    zs_i = tl.zeros([BM], tl.float32)
    v_lo = pid_s * VS
    v_hi = tl.minimum(V, v_lo + VS)
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < v_hi
        w_row = W + row_offset(cols, stride_w)
        acc = tl.zeros([BM, BV], tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + offs_d
            dmask = dd < D
            xt = tl.load(x_row[:, None] + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            wt = tl.load(w_row[None, :] + dd[:, None], mask=cmask[None, :] & dmask[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        z = _epilogue(acc, B, cols[None, :], cmask[None, :], cap, HAS_BIAS, HAS_CAP)
        m_i, s_i, t_i, zs_i = _fold_tile(m_i, s_i, t_i, zs_i, z, cmask[None, :], (v0 - v_lo) * 1.0)
        g_i += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    off = pid_s.to(tl.int64) * M + rows
    tl.store(PART + off, m_i, mask=rmask)
    tl.store(PART + SM + off, s_i, mask=rmask)
    tl.store(PART + 2 * SM + off, t_i, mask=rmask)
    tl.store(PART + 3 * SM + off, g_i, mask=rmask)
    tl.store(PART + 4 * SM + off, zs_i, mask=rmask)


@triton.jit
def _rows_kernel(
    L, stride_l, OUT, stride_o, B, Y, MAX, LSE, SCALE, STATS, stride_st,
    n, V, v_off, cap, z_loss_x2, gold_weight, smooth_per_id,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_SCALE: tl.constexpr, DO_STATS: tl.constexpr, DO_GRAD: tl.constexpr,
    BR: tl.constexpr, BV: tl.constexpr,
):
    # BR rows per program (1 on a GPU, a block in the interpreter whose cost is per operation)
    ridx = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = ridx < n
    row = ridx
    base = L + row_offset(row, stride_l)
    y = tl.load(Y + row, mask=rmask, other=0)
    offs = tl.arange(0, BV)
    if DO_STATS:
        m = tl.full([BR], -1.0e30, tl.float32)
        s = tl.zeros([BR], tl.float32)
        t = tl.zeros([BR], tl.float32)
        zs = tl.zeros([BR], tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + offs
            cmask = cols < V
            z = tl.load(base[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            z = _epilogue(z, B, cols[None, :], cmask[None, :], cap, HAS_BIAS, HAS_CAP)
            m, s, t, zs = _fold_tile(m, s, t, zs, z, cmask[None, :], v0 * 1.0)
        lse = tl.log(s)  # relative to the row max m
        gz = _epilogue(tl.load(base + y, mask=rmask, other=0.0), B, y, rmask, cap, HAS_BIAS, HAS_CAP)
        st = STATS + row
        tl.store(st, m, mask=rmask)
        tl.store(st + stride_st, lse, mask=rmask)
        tl.store(st + 2 * stride_st, gz - m, mask=rmask)
        tl.store(st + 3 * stride_st, lse - t / s, mask=rmask)
        tl.store(st + 4 * stride_st, zs, mask=rmask)
    else:
        m = tl.load(MAX + row, mask=rmask, other=0.0)
        lse = tl.load(LSE + row, mask=rmask, other=0.0)
    if DO_GRAD:
        # the buffer may hold a vocabulary block [v_off, v_off + V): gold column relative to it
        y_blk = (y - v_off)[:, None]
        coef = (1.0 + z_loss_x2 * (m + lse))[:, None]
        m2 = m[:, None]
        lse2 = lse[:, None]
        out_base = OUT + row_offset(row, stride_o)
        if HAS_SCALE:
            scale = tl.load(SCALE + row, mask=rmask, other=0.0)[:, None]
        for v0 in range(0, V, BV):
            cols = v0 + offs
            cmask = cols < V
            mask2 = rmask[:, None] & cmask[None, :]
            z = tl.load(base[:, None] + cols[None, :], mask=mask2, other=0.0)
            z = _epilogue(z, B, cols[None, :], cmask[None, :], cap, HAS_BIAS, HAS_CAP)
            g = tl.exp((z - m2) - lse2) * coef - smooth_per_id
            g -= tl.where(cols[None, :] == y_blk, gold_weight, 0.0)
            if HAS_CAP:
                zr = z / cap
                g = g * (1.0 - zr * zr)
            if HAS_SCALE:
                g = g * scale
            tl.store(out_base[:, None] + cols[None, :], g.to(OUT.dtype.element_ty), mask=mask2)


INTERPRETED: bool = isinstance(_stats_kernel, _Interpreted) if _Interpreted else False
"""True when the kernels were created by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""

_FUSED_CONFIGS = [
    triton.Config({"BM": 128, "BV": 128, "BD": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BV": 256, "BD": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BV": 256, "BD": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BV": 128, "BD": 32}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BV": 128, "BD": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BV": 128, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BM": 16, "BV": 256, "BD": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 16, "BV": 128, "BD": 32}, num_warps=4, num_stages=3),
]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose operand tiles overflow ~200 KB of shared memory (fp32 IEEE tiles
    are twice the size) and, for few rows, row blocks far larger than the row count."""
    ieee = bool(kwargs.get("IEEE", named_args.get("IEEE", False)))
    elsize = 4 if ieee else 2

    def smem(c):
        kw = c.kwargs
        return (kw["BM"] + kw["BV"]) * kw["BD"] * elsize * max(1, c.num_stages)

    fit = [c for c in configs if smem(c) <= 200_000] or [min(configs, key=smem)]
    m_cap = max(16, _pow2(int(named_args["M"])))
    small = [c for c in fit if c.kwargs["BM"] <= m_cap]
    return small or [min(fit, key=lambda c: c.kwargs["BM"])]


_stats_tuned = triton.autotune(
    configs=_FUSED_CONFIGS, key=["V", "D", "M_KEY"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_stats_kernel)

#: vocabulary split sizes are multiples of this (a multiple of every BV in use)
_SPLIT_ALIGN = 256


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def _ieee(dtype: torch.dtype) -> bool:
    """Whether tl.dot must run in full fp32 (fp32 inputs unless torch allows TF32)."""
    if INTERPRETED:
        return True
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def _splits(M: int, V: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(number of vocabulary splits, split size) for the fused statistics kernel."""
    if splits is None:
        if INTERPRETED or device.type != "cuda":
            splits = 1
        else:
            n_sm = torch.cuda.get_device_properties(device).multi_processor_count
            row_blocks = math.ceil(M / 128)
            splits = _clamp(math.ceil(2 * n_sm / row_blocks), 1, max(1, math.ceil(V / 2048)))
    splits = _clamp(int(splits), 1, max(1, math.ceil(V / _SPLIT_ALIGN)))
    vs = math.ceil(math.ceil(V / splits) / _SPLIT_ALIGN) * _SPLIT_ALIGN
    return math.ceil(V / vs), vs


def fused_stats(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    softcap: float | None,
    out: torch.Tensor,
    splits: int | None = None,
) -> None:
    """Per-row statistics of ``x @ w.T (+ b)`` without materialising logits.

    Args:
        x: ``[M, D]`` fp32/fp16/bf16, unit stride along ``D``.
        w: ``[V, D]`` same dtype, unit stride along ``D``.
        b: ``[V]`` same dtype, contiguous, or None.
        y: ``[M]`` int64 gold ids in ``[0, V)``, contiguous.
        softcap: logit softcap or None.
        out: ``[5, M]`` fp32, written with (row_max, lse, gold, entropy, sum_logits), the
            middle three and the last relative to row_max.
        splits: number of vocabulary splits (None: chosen from the device's SM count).
    """
    M, D = x.shape
    V = w.shape[0]
    if M == 0:
        return
    n_split, vs = _splits(M, V, x.device, splits)
    part = torch.empty(5, n_split, M, dtype=torch.float32, device=x.device)
    cap = float(softcap) if softcap is not None else 1.0
    args = (x, w, b if b is not None else x, y, part, M, V, D, vs, n_split * M,
            x.stride(0), w.stride(0), cap, min(_pow2(M), 4096))
    flags = dict(HAS_BIAS=b is not None, HAS_CAP=softcap is not None, IEEE=_ieee(x.dtype))
    if INTERPRETED:
        # one small fixed config: the interpreter's cost is per tile operation
        bm = _clamp(_pow2(M), 16, 64)
        _stats_kernel[(math.ceil(M / bm), n_split)](
            *args, **flags, BM=bm, BV=_clamp(_pow2(V), 16, 512), BD=_clamp(_pow2(D), 16, 64),
        )
    else:
        _stats_tuned[lambda meta: (triton.cdiv(M, meta["BM"]), n_split)](*args, **flags)
    pm, ps, pt, pg, pz = part.unbind(0)
    if n_split == 1:
        m, s, t, zs = pm[0], ps[0], pt[0], pz[0]
    else:
        m = pm.max(dim=0).values
        a = torch.exp(pm - m)
        s = (a * ps).sum(0)
        t = (a * (pt + (pm - m) * ps)).sum(0)
        cols = torch.tensor([min(vs, V - k * vs) for k in range(n_split)], dtype=torch.float32,
                            device=x.device)
        zs = (pz + cols[:, None] * (pm - m)).sum(0)
    log_s = torch.log(s)
    out[0].copy_(m)
    out[1].copy_(log_s)
    out[2].copy_(pg.sum(0) - m)
    out[3].copy_(log_s - t / s)
    out[4].copy_(zs)


def _rows_block(n: int, V: int) -> tuple[int, int, int]:
    """(BR, BV, num_warps) of the row kernel."""
    if INTERPRETED:
        bv = _clamp(_pow2(V), 16, 4096)
        return _clamp(_pow2(n), 1, max(1, 16384 // bv)), bv, 4
    bv = _clamp(_pow2(V), 128, 8192)
    return 1, bv, (16 if bv >= 8192 else 8 if bv >= 2048 else 4)


def rows_stats(logits: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, *, softcap: float | None,
               stats_out: torch.Tensor) -> None:
    """Statistics of the rows of a ``[R, V]`` logits buffer (``logits`` is not modified).

    ``logits``: raw ``x @ w.T`` (fp32/fp16/bf16, unit stride along ``V``); ``b``: ``[V]`` bias or
    None (added in fp32); ``y``: ``[R]`` int64 gold ids; ``stats_out``: ``[5, R]`` fp32 (unit
    stride along rows) receiving (row_max, lse, gold, entropy, sum_logits), the last four
    relative to row_max.
    """
    _launch_rows(logits, logits, b, y, stats_out=stats_out, softcap=softcap, grad=False)


def rows_stats_grad(logits: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, *, softcap: float | None,
                    z_loss: float, label_smoothing: float, stats_out: torch.Tensor,
                    out: torch.Tensor | None = None) -> None:
    """:func:`rows_stats`, and ``out`` (``[R, V]``, unit stride along ``V``; None: ``logits``
    itself, in place) := ``d(loss)/d(raw logits)`` of whole rows with a unit upstream gradient.
    An fp32 ``logits`` buffer with a half-precision ``out`` keeps the logits fp32 from the GEMM
    through the bias / softcap epilogue."""
    _launch_rows(logits, logits if out is None else out, b, y, stats_out=stats_out, softcap=softcap,
                 z_loss=z_loss, label_smoothing=label_smoothing)


def rows_grad(logits: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, *, row_max: torch.Tensor,
              lse: torch.Tensor, row_scale: torch.Tensor | None, softcap: float | None, z_loss: float,
              label_smoothing: float, v_off: int = 0, vocab: int | None = None,
              out: torch.Tensor | None = None) -> None:
    """``out`` := ``row_scale * d(loss)/d(raw logits)`` of the columns of a logits buffer that
    holds the vocabulary ids ``[v_off, v_off + V)`` of a vocabulary of ``vocab`` (default ``V``)
    ids, given each row's ``row_max`` and ``lse`` (``[R]`` fp32, relative to it); ``b`` is the
    block's bias; ``row_scale`` ``[R]`` fp32 or None (1); ``out`` as in :func:`rows_stats_grad`."""
    _launch_rows(logits, logits if out is None else out, b, y, row_max=row_max, lse=lse, row_scale=row_scale,
                 softcap=softcap, z_loss=z_loss, label_smoothing=label_smoothing, v_off=v_off,
                 vocab=logits.shape[1] if vocab is None else int(vocab))


def _launch_rows(logits, out, b, y, *, softcap, stats_out=None, row_max=None, lse=None, row_scale=None,
                 z_loss=0.0, label_smoothing=0.0, v_off=0, vocab=None, grad=True) -> None:
    """One launch of ``_rows_kernel`` (the three launchers above name its modes)."""
    R, V = logits.shape
    if R == 0 or V == 0:
        return
    if out.shape != logits.shape or out.stride(-1) != 1:
        raise ValueError(f"out: expected shape {tuple(logits.shape)} with unit stride, got {tuple(out.shape)}")
    vocab = V if vocab is None else vocab
    br, bv, warps = _rows_block(R, V)
    dummy = logits
    _rows_kernel[(math.ceil(R / br),)](
        logits, logits.stride(0), out, out.stride(0), dummy if b is None else b, y,
        dummy if row_max is None else row_max, dummy if lse is None else lse,
        dummy if row_scale is None else row_scale, dummy if stats_out is None else stats_out,
        0 if stats_out is None else stats_out.stride(0),
        R, V, int(v_off), 1.0 if softcap is None else float(softcap), 2.0 * float(z_loss),
        1.0 - float(label_smoothing), float(label_smoothing) / vocab,
        HAS_BIAS=b is not None, HAS_CAP=softcap is not None, HAS_SCALE=row_scale is not None,
        DO_STATS=stats_out is not None, DO_GRAD=grad, BR=br, BV=bv, num_warps=warps,
    )
