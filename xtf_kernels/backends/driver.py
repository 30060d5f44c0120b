"""The one orchestration of masked CE: every backend plugs its per-row primitives in here.

A backend is a :class:`DriverBackend` that supplies only what differs between devices:

``logits_dtype(x, b, cfg)`` / ``logits_(out, x, wt)``
    the dtype of a logits buffer and the GEMM that fills it (default: ``x.dtype``, or fp32
    straight from the GEMM accumulator where a half-precision epilogue follows on CUDA);
``row_stats(z, y, b, cfg) -> RowStats``
    the statistics of whole rows of raw logits ``z`` ``[r, V]`` (``z`` is not modified);
``row_grad_(z, y, row_max, lse, scale, b, db, v0, vocab_start, vocab, cfg, out)``
    ``out`` ``[r, C]`` (``z`` itself or a buffer of ``x.dtype``) := ``scale * d loss / d raw``
    for the columns ``[v0, v0 + C)`` of ``w``, given the rows' ``row_max`` and ``lse``; ``b``
    and ``db`` (fp32, accumulated) are ``w``'s whole bias and bias gradient or None; the gold
    column of row ``i`` is ``y[i] - vocab_start - v0`` (no gold term outside the block);
    ``vocab`` is the whole vocabulary (label smoothing's ``1 / V``);
``stats_and_grad_(z, y, b, cfg, out, db) -> RowStats``
    optional fused form of the two for whole rows with a unit upstream gradient (the C++ and
    Triton one-pass row kernels); the default calls ``row_stats`` then ``row_grad_``;
``fused_stats(x, w, b, y, cfg) -> RowStats | None``
    optional statistics with no logits in memory (the Triton GEMM kernel); None: not here;

and two plan policies: ``chunked_grad`` (``"accumulate"``: a gradient that needs several row
chunks sums dW in an fp32 ``[V, D]`` buffer; ``"recompute"``: statistics first, then the
vocabulary-blocked recompute, cheaper than that read-modify-write on a GPU) and
``keep_all_half`` (half-precision gradient logits of every row are held at once when they cost
no more than the fp32 dW accumulator they replace: dW is then one GEMM), and ``chunk_up_to_dw``
(a gradient sweep of several row chunks may hold up to ``2 * chunk_elems`` logits, no more than
its fp32 ``[V, D]`` dW accumulator: ``min(2 * chunk_elems, max(chunk_elems, V * D))``; on the CPU
each chunk costs a pass over the head in its logits and dX GEMMs and one over dW in its dW GEMM,
so fewer chunks are faster).

The driver owns the rest, once for every backend: the chunk plan (:mod:`._plan`), vocabulary
blocks, row compaction, the gradient-in-forward vs recompute choice, the rowwise ``select``,
and every dX / dW accumulation (:func:`._gemm.acc_mm`).
"""

from __future__ import annotations

import dataclasses

import torch

from ._filter import grad_gemms
from ._gemm import HALF, acc_mm, f32_epilogue, fast_f32_gemm
from ._plan import rows_per_chunk, spans, vocab_blocks
from .base import (
    BackendBase,
    CEConfig,
    ForwardOut,
    GradOut,
    RowSelect,
    RowStats,
    cpu_fp32_call,
    select_rows,
)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DriverBackend(BackendBase):
    """A backend made of per-row primitives (module doc); ``forward``, ``backward`` and
    ``forward_rowwise`` are the driver's."""

    #: "accumulate" or "recompute": how a gradient that needs several row chunks is formed
    chunked_grad = "accumulate"
    #: hold every row's half-precision gradient logits when they cost <= the fp32 dW buffer
    keep_all_half = False
    #: a row sweep that sums dW over chunks may hold up to twice ``chunk_elems`` logits, no more
    #: than that fp32 ``[V, D]`` buffer (fewer chunks: each re-reads the head in two GEMMs, dW in a third)
    chunk_up_to_dw = False
    #: bf16 / fp16 CPU inputs run in fp32 (:func:`~.base.cpu_fp32_call`)
    cpu_fp32 = True

    # ------------------------------------------------------------ primitives
    def logits_dtype(self, x: torch.Tensor, b: torch.Tensor | None, cfg: CEConfig) -> torch.dtype:
        """dtype of a logits buffer for rows of ``x``."""
        fp32 = f32_epilogue(x.dtype, b is not None, cfg.softcap) and fast_f32_gemm(x.device)
        return torch.float32 if fp32 else x.dtype

    def logits_(self, out: torch.Tensor, x: torch.Tensor, wt: torch.Tensor) -> None:
        """``out = x @ wt`` (the raw logits; ``out`` in :meth:`logits_dtype`)."""
        acc_mm(out, x, wt, accumulate=False)

    def row_stats(self, z, y, b, cfg: CEConfig) -> RowStats:
        raise NotImplementedError

    def row_grad_(self, z, y, row_max, lse, scale, b, db, v0: int, vocab_start: int, vocab: int,
                  cfg: CEConfig, out) -> None:
        raise NotImplementedError

    def stats_and_grad_(self, z, y, b, cfg: CEConfig, out, db) -> RowStats:
        st = self.row_stats(z, y, b, cfg)
        self.row_grad_(z, y, st.row_max, st.lse, None, b, db, 0, 0, z.shape[1], cfg, out)
        return st

    def fused_stats(self, x, w, b, y, cfg: CEConfig) -> RowStats | None:
        return None

    # ------------------------------------------------------------ the contract
    @cpu_fp32_call
    def forward(self, x, w, b, y, cfg: CEConfig, n_grad: int) -> ForwardOut:
        return forward(self, *_prep(x, w, b, y), cfg, n_grad)

    @cpu_fp32_call
    def forward_rowwise(self, x, w, b, y, cfg: CEConfig, row_select: RowSelect) -> tuple[ForwardOut, torch.Tensor]:
        return forward_rowwise(self, *_prep(x, w, b, y), cfg, row_select)

    @cpu_fp32_call
    def backward(self, x, w, b, y, row_max, lse, row_scale, cfg: CEConfig, *, vocab_start: int = 0,
                 vocab: int | None = None, skipped_out: torch.Tensor | None = None) -> GradOut:
        return backward(self, *_prep(x, w, b, y), row_max, lse, row_scale, cfg, vocab_start=vocab_start,
                        vocab=vocab, skipped_out=skipped_out)


def _prep(x, w, b, y):
    """Unit stride along the feature / vocabulary dims, contiguous labels (what kernels index)."""
    x = x if x.is_contiguous() else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    return x, w, None if b is None else b.contiguous(), y.contiguous()


# ---------------------------------------------------------------- entry points
def forward(k: DriverBackend, x, w, b, y, cfg: CEConfig, n_grad: int) -> ForwardOut:
    """Statistics of every row of ``x`` ``[M, D]``; the gradient (unit upstream) of the first
    ``n_grad`` rows: ``dx`` ``[n_grad, D]`` x.dtype, ``dw`` ``[V, D]`` fp32 or w.dtype, ``db``."""
    M = x.shape[0]
    st = RowStats.empty(M, device=x.device, dtype=acc_dtype(x.dtype))
    grad = (None, None, None, None)
    if n_grad:
        rows = _grad_chunk_rows(k, x[:n_grad], w, b, cfg)
        if rows is None:  # statistics of every row first, then the blocked recompute
            _stats_only(k, x, w, b, y, cfg, st)
            grad = _blocked_grad(k, x[:n_grad], w, b, y[:n_grad], st.row_max[:n_grad], st.lse[:n_grad],
                                 None, cfg)
            return ForwardOut.of(st, *grad)
        dx, dw, db, _, skipped = _sweep(k, x[:n_grad], w, b, y[:n_grad], cfg, st.rows(0, n_grad), rows)
        grad = (dx, dw, db, skipped)
    if M > n_grad:
        _stats_only(k, x[n_grad:], w, b, y[n_grad:], cfg, st.rows(n_grad, M))
    return ForwardOut.of(st, *grad)


def forward_rowwise(k: DriverBackend, x, w, b, y, cfg: CEConfig, row_select: RowSelect
                    ) -> tuple[ForwardOut, torch.Tensor]:
    """Like :func:`forward`, the gradient rows chosen chunk by chunk by ``row_select`` while the
    chunk's logits are in memory (one logits GEMM for statistics, selection and gradient).
    Returns the output (``dx`` of the selected rows in row order) and the bool ``[M]`` selection."""
    st = RowStats.empty(x.shape[0], device=x.device, dtype=acc_dtype(x.dtype))
    rows = _grad_chunk_rows(k, x, w, b, cfg)
    if rows is not None:
        dx, dw, db, sel, skipped = _sweep(k, x, w, b, y, cfg, st, rows, row_select)
        return ForwardOut.of(st, dx, dw, db, skipped), sel
    sel = _stats_only(k, x, w, b, y, cfg, st, row_select)
    idx = sel.nonzero().squeeze(1)
    grad = _blocked_grad(k, x.index_select(0, idx), w, b, y.index_select(0, idx),
                         st.row_max.index_select(0, idx), st.lse.index_select(0, idx), None, cfg)
    return ForwardOut.of(st, *grad), sel


def backward(k: DriverBackend, x, w, b, y, row_max, lse, row_scale, cfg: CEConfig, *, vocab_start: int = 0,
             vocab: int | None = None, skipped_out: torch.Tensor | None = None) -> GradOut:
    """Gradient of ``sum_i row_scale[i] * loss_i`` by recomputing the rows' logits.

    ``w`` / ``b`` may be a vocabulary shard: rows ``[vocab_start, vocab_start + V)`` of a
    vocabulary of ``vocab`` ids (default: ``w`` is all of it), ``y`` holds global ids and
    ``row_max`` / ``lse`` the global statistics. Returns ``dx`` ``[M, D]`` x.dtype, ``dw``
    ``[V, D]`` w.dtype, ``db`` ``[V]`` fp32 or None. With ``cfg.grad_filter``, ``skipped_out``
    (fp32 ``[M]``) receives the mass the filter skipped per row.
    """
    acc = acc_dtype(x.dtype)
    row_max, lse = row_max.to(acc).contiguous(), lse.to(acc).contiguous()
    dx, dw, db, skipped = _blocked_grad(k, x, w, b, y, row_max, lse, row_scale.to(acc).contiguous(), cfg,
                                        vocab_start=vocab_start, vocab=vocab)
    if skipped_out is not None and skipped is not None:
        skipped_out.copy_(skipped)
    return GradOut(dx, dw, db)


# ---------------------------------------------------------------- the plan
def _grad_chunk_rows(k: DriverBackend, x, w, b, cfg: CEConfig) -> int | None:
    """Rows per chunk of a gradient sweep over the rows of ``x``, or None: use statistics and
    then the vocabulary-blocked recompute (``k.chunked_grad == "recompute"`` and more than one
    chunk)."""
    n, D = x.shape
    V = w.shape[0]
    ldt = k.logits_dtype(x, b, cfg)
    if k.keep_all_half and x.dtype in HALF and n * V * ldt.itemsize <= max(cfg.chunk_elems * 4, V * D * 4):
        return max(n, 1)
    if k.chunk_up_to_dw and V * D > cfg.chunk_elems:
        cfg = dataclasses.replace(cfg, chunk_elems=min(V * D, 2 * cfg.chunk_elems))
    rows = rows_per_chunk(n, V, cfg, ldt)
    if rows < n and k.chunked_grad == "recompute":
        return None
    return rows


def _buffers(k: DriverBackend, rows: int, cols: int, x, b, cfg: CEConfig, grad: bool = True):
    """(logits buffer ``[rows, cols]``, gradient buffer of ``x.dtype`` or None when the logits
    buffer already has ``x.dtype`` and is overwritten in place)."""
    dt = k.logits_dtype(x, b, cfg)
    buf = torch.empty(rows, cols, dtype=dt, device=x.device)
    gbuf = torch.empty(rows, cols, dtype=x.dtype, device=x.device) if (grad and dt != x.dtype) else None
    return buf, gbuf


# ---------------------------------------------------------------- the loops
def _stats_only(k: DriverBackend, x, w, b, y, cfg: CEConfig, st: RowStats,
                row_select: RowSelect | None = None) -> torch.Tensor | None:
    """Statistics of the rows of ``x`` into ``st`` (the backend's fused kernel when it has one);
    with ``row_select``, the bool selection it made chunk by chunk (else None)."""
    n, V = x.shape[0], w.shape[0]
    sel = None if row_select is None else torch.zeros(n, dtype=torch.bool, device=x.device)
    if n == 0:
        return sel
    if row_select is None:
        fs = k.fused_stats(x, w, b, y, cfg)
        if fs is not None:
            st.put(0, n, fs)
            return None
    rows = rows_per_chunk(n, V, cfg, k.logits_dtype(x, b, cfg))
    buf, _ = _buffers(k, rows, V, x, b, cfg, grad=False)
    wt = w.t()
    for s, e in spans(n, rows):
        z = buf[: e - s]
        k.logits_(z, x[s:e], wt)
        cs = k.row_stats(z, y[s:e], b, cfg)
        st.put(s, e, cs)
        if sel is not None:
            sel[s:e] = select_rows(row_select, s, e, cs)
    return sel


def _sweep(k: DriverBackend, x, w, b, y, cfg: CEConfig, st: RowStats, rows: int,
           row_select: RowSelect | None = None):
    """Row chunks of ``rows`` rows over the whole vocabulary: statistics into ``st`` and the
    gradient of every row, or of the rows ``row_select`` picks. Returns ``(dx, dw, db, sel,
    skipped)`` (``sel`` bool ``[n]`` with ``row_select``, else None; ``skipped`` the filter's
    per-row mass, None without ``cfg.grad_filter``); with one chunk dW is one GEMM in
    ``w.dtype``, otherwise an fp32 sum."""
    n, D = x.shape
    V = w.shape[0]
    dev, acc = x.device, acc_dtype(x.dtype)
    one = rows >= n
    dw = torch.empty(V, D, dtype=w.dtype if one else acc, device=dev)
    dw_written = False  # the first GEMM into dw writes it (no zero fill of the [V, D] buffer)
    db = torch.zeros(V, dtype=acc, device=dev) if b is not None else None
    sel = None if row_select is None else torch.zeros(n, dtype=torch.bool, device=dev)
    dx = torch.empty(n, D, dtype=x.dtype, device=dev) if row_select is None else None
    parts: list[torch.Tensor] = []
    skips: list[torch.Tensor] = []
    buf, gbuf = _buffers(k, min(rows, max(n, 1)), V, x, b, cfg)
    wt = w.t()
    for s, e in spans(n, rows):
        z = buf[: e - s]
        k.logits_(z, x[s:e], wt)
        g = z if gbuf is None else gbuf[: e - s]
        if row_select is None:
            st.put(s, e, k.stats_and_grad_(z, y[s:e], b, cfg, g, db))
            gs, xs, dxs = g, x[s:e], dx[s:e]
        else:
            cs = k.row_stats(z, y[s:e], b, cfg)
            st.put(s, e, cs)
            m = select_rows(row_select, s, e, cs)
            sel[s:e] = m
            idx = m.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            gs = _selected_grad(k, z, g, idx, y[s:e], cs, b, db, cfg, in_place=one)
            xs = x[s:e] if idx.numel() == e - s else x[s:e].index_select(0, idx)
            dxs = torch.empty(idx.numel(), D, dtype=x.dtype, device=dev)
            parts.append(dxs)
        sk = grad_gemms(gs, xs, w, dxs, dw, acc_dx=False, acc_dw=dw_written, rule=cfg.grad_filter)
        dw_written = True
        if sk is not None:
            skips.append(sk)
    if not dw_written:
        dw.zero_()
    if row_select is not None:
        dx = torch.cat(parts) if parts else x.new_empty(0, D)
    skipped = None
    if cfg.grad_filter is not None:
        skipped = torch.cat(skips) if skips else torch.zeros(0, dtype=torch.float32, device=dev)
    return dx, dw, db, sel, skipped


def _selected_grad(k: DriverBackend, z, g, idx, y, cs: RowStats, b, db, cfg: CEConfig, in_place: bool):
    """The gradient logits ``[len(idx), V]`` of the rows ``idx`` of the chunk ``z`` (statistics
    ``cs``). ``in_place``: the rows are moved to the front of ``z`` (no second buffer as large as
    a whole-batch chunk); otherwise gathered into a new one."""
    r = idx.numel()
    if r == z.shape[0]:
        zs, gs = z, g
    elif in_place:
        for i, src in enumerate(idx.tolist()):  # src >= i: a forward copy never clobbers an unread row
            if src != i:
                z[i].copy_(z[src])
        zs, gs = z[:r], g[:r]
    else:
        zs = z.index_select(0, idx)
        gs = zs if g is z else g[:r]
    V = z.shape[1]
    k.row_grad_(zs, y.index_select(0, idx), cs.row_max.index_select(0, idx), cs.lse.index_select(0, idx),
                None, b, db, 0, 0, V, cfg, gs)
    return gs


def _blocked_grad(k: DriverBackend, x, w, b, y, row_max, lse, scale, cfg: CEConfig, *, vocab_start: int = 0,
                  vocab: int | None = None):
    """Gradient of ``sum_i scale[i] * loss_i`` (scale 1 when None) by vocabulary blocks of the
    one plan (:func:`._plan.vocab_blocks`): per block, logits, ``row_grad_``, ``dx += G @ W_blk``
    and ``dW_blk (+)= G^T @ X``. Returns ``(dx x.dtype, dw, db fp32 or None, skipped)``: ``dw``
    in ``w.dtype`` when every block holds all rows (one GEMM per block, fp32 inside it), else an
    fp32 sum over the row chunks; ``skipped`` the filter's per-row mass (each block gets its
    share ``C / vocab`` of the bound), None without ``cfg.grad_filter``."""
    n, D = x.shape
    V = w.shape[0]
    vocab = V if vocab is None else int(vocab)
    dev, acc = x.device, acc_dtype(x.dtype)
    db = torch.zeros(V, dtype=acc, device=dev) if b is not None else None
    filt = cfg.grad_filter
    skipped = None if filt is None else torch.zeros(n, dtype=torch.float32, device=dev)
    if n == 0:
        return x.new_empty(0, D), torch.zeros(V, D, dtype=w.dtype, device=dev), db, skipped
    rc, vb = vocab_blocks(n, V, cfg, k.logits_dtype(x, b, cfg))
    one = rc >= n
    # written by the first block / row chunk that reaches them: no zero fill
    dw = torch.empty(V, D, dtype=w.dtype if one else acc, device=dev)
    dx = torch.empty(n, D, dtype=acc, device=dev)
    buf, gbuf = _buffers(k, min(rc, n), vb, x, b, cfg)  # row stride vb (128-aligned) in every block
    for v0, v1 in spans(V, vb):
        wb = w[v0:v1]
        for s, e in spans(n, rc):
            z = buf[: e - s, : v1 - v0]
            k.logits_(z, x[s:e], wb.t())
            g = z if gbuf is None else gbuf[: e - s, : v1 - v0]
            sc = None if scale is None else scale[s:e]
            # filtered: the unit-upstream gradient decides what is skipped; the scale follows
            late = filt is not None and sc is not None
            k.row_grad_(z, y[s:e], row_max[s:e], lse[s:e], None if filt else sc, b, None if late else db, v0,
                        vocab_start, vocab, cfg, g)
            if late and db is not None:  # the bias gradient stays exact
                db[v0:v1] += g.t().to(acc) @ sc.to(acc)
            rule = None if filt is None else (filt[0], None if filt[1] is None else filt[1] * (v1 - v0) / vocab)
            sk = grad_gemms(g, x[s:e], wb, dx[s:e], dw[v0:v1], acc_dx=v0 > 0, acc_dw=s > 0, rule=rule,
                            row_scale=sc if filt else None)
            if sk is not None:
                skipped[s:e] += sk
    return dx.to(x.dtype), dw, db, skipped
