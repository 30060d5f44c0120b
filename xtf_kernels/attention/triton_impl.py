"""Triton kernels for attention received (CUDA; also runs in Triton's interpreter on CPU).

Kernel 1 (one program per query tile and head): flash-attention forward; online log-sum-exp
of the visible scores, written to an fp32 [B, Hq, L] buffer, and optionally the attention
output ``softmax(s) @ V`` (so a layer's output and its row log-sum-exp come from one pass).
Kernel 2 (one program per key tile and head): loops over the query tiles that can see the key
tile, recomputes ``s = q.k * scale`` (softcapped), and accumulates ``exp(s - lse_i)`` over the
queries into fp32 [B, Hq, L]. No [L, L] buffer is ever written; grouped-query attention reads
the shared key head ``h // (Hq / Hkv)`` directly.

Documents (packed rows): both kernels read each token's document start/end (int32 [B, L]) and
narrow their loops to the tiles of the documents they touch, so tiles lying entirely in other
documents are never loaded; tiles straddling a boundary are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import triton_interpret
from ..documents import Documents


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET`` = 1/true/on/yes)."""
    return triton_interpret()


def available(device: torch.device) -> tuple[bool, str]:
    """(can run on ``device``, reason when not)."""
    if device.type == "cuda":
        return True, ""
    if interpreting():
        return True, ""
    return False, f"Triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter); got {device}"


@triton.jit
def _scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        # fp32 inputs (or bf16 upcast for the interpreter, whose bf16 dot is wrong)
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if HAS_SOFTCAP:
        # softcap * tanh(s / softcap), tanh(x) = 2 * sigmoid(2x) - 1
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    return s


@triton.jit
def _visible(offs_m, offs_n, vq, vk, dq, dk, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    d = offs_m[:, None] - offs_n[None, :]
    ok = vq[:, None] & vk[None, :] & (offs_m[:, None] < L) & (offs_n[None, :] < L) & (dq[:, None] == dk[None, :])
    if CAUSAL:
        ok = ok & (d >= 0)
        if HAS_WINDOW:
            ok = ok & (d < window)
    else:
        if HAS_WINDOW:
            ok = ok & (d <= window) & (d >= -window)
    return ok


@triton.jit
def _fwd_kernel(
    Q, K, V, VALID, DSTART, DEND, LSE, OUT, TILES,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    L, Dh, Dv, Hq, G, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    HAS_V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    q0 = pid_m * BM
    offs_m = q0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_m = offs_m < L
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :] * sqd,
        mask=in_m[:, None] & (offs_d[None, :] < Dh),
        other=0.0,
    )
    vq = tl.load(VALID + b * L + offs_m, mask=in_m, other=0) != 0
    dq = tl.load(DSTART + b * L + offs_m, mask=in_m, other=-1)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    q1 = tl.minimum(q0 + BM, L)
    lo = 0
    hi = L
    if CAUSAL:
        hi = q1
        if HAS_WINDOW:
            lo = tl.maximum(q0 - window + 1, 0)
    else:
        if HAS_WINDOW:
            lo = tl.maximum(q0 - window, 0)
            hi = tl.minimum(q1 + window, L)
        # keys after the last query's document are seen by nobody here
        hi = tl.minimum(hi, tl.load(DEND + b * L + q1 - 1))
    # keys before the first query's document are seen by nobody here
    lo = tl.maximum(lo, tl.load(DSTART + b * L + q0))
    lo = (lo // BN) * BN
    for start_n in range(lo, hi, BN):
        if COUNT_TILES:
            tl.atomic_add(TILES, 1)
        offs_n = start_n + tl.arange(0, BN)
        in_n = offs_n < L
        k = tl.load(
            K + b * skb + hk * skh + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
            mask=in_n[:, None] & (offs_d[None, :] < Dh),
            other=0.0,
        )
        vk = tl.load(VALID + b * L + offs_n, mask=in_n, other=0) != 0
        dk = tl.load(DSTART + b * L + offs_n, mask=in_n, other=-2)
        s = _scores(q, k, scale, softcap, HAS_SOFTCAP, IEEE)
        ok = _visible(offs_m, offs_n, vq, vk, dq, dk, L, window, CAUSAL, HAS_WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_V:
            vt = tl.load(
                V + b * svb + hk * svh + offs_n[:, None].to(tl.int64) * svl + offs_dv[None, :] * svd,
                mask=in_n[:, None] & (offs_dv[None, :] < Dv),
                other=0.0,
            )
            if IEEE:
                pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
        m_i = m_new
    # queries that see no key (padding) get lse 0 and output 0; kernel 2 never uses them
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    lse = m_safe + tl.log(l_safe)
    tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse, mask=in_m)
    if HAS_V:
        o = tl.where((l_i > 0.0)[:, None], acc / l_safe[:, None], 0.0)
        tl.store(
            OUT + b * sob + h * soh + offs_m[:, None].to(tl.int64) * sol + offs_dv[None, :] * sod,
            o.to(OUT.dtype.element_ty),
            mask=in_m[:, None] & (offs_dv[None, :] < Dv),
        )


@triton.jit
def _received_kernel(
    Q, K, VALID, DSTART, DEND, LSE, OUT, TILES,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    L, Dh, Hq, G, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    k0 = pid_n * BN
    offs_n = k0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    in_n = offs_n < L
    k = tl.load(
        K + b * skb + hk * skh + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
        mask=in_n[:, None] & (offs_d[None, :] < Dh),
        other=0.0,
    )
    vk = tl.load(VALID + b * L + offs_n, mask=in_n, other=0) != 0
    dk = tl.load(DSTART + b * L + offs_n, mask=in_n, other=-2)
    acc = tl.zeros([BN], tl.float32)
    k1 = tl.minimum(k0 + BN, L)
    lo = 0
    hi = L
    if CAUSAL:
        lo = k0
        if HAS_WINDOW:
            hi = tl.minimum(k1 - 1 + window, L)
    else:
        if HAS_WINDOW:
            lo = tl.maximum(k0 - window, 0)
            hi = tl.minimum(k1 + window, L)
        lo = tl.maximum(lo, tl.load(DSTART + b * L + k0))
    # queries after the last key's document see none of these keys
    hi = tl.minimum(hi, tl.load(DEND + b * L + k1 - 1))
    lo = (lo // BM) * BM
    for start_m in range(lo, hi, BM):
        if COUNT_TILES:
            tl.atomic_add(TILES + 1, 1)
        offs_m = start_m + tl.arange(0, BM)
        in_m = offs_m < L
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :] * sqd,
            mask=in_m[:, None] & (offs_d[None, :] < Dh),
            other=0.0,
        )
        vq = tl.load(VALID + b * L + offs_m, mask=in_m, other=0) != 0
        dq = tl.load(DSTART + b * L + offs_m, mask=in_m, other=-1)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * L + offs_m, mask=in_m, other=0.0)
        s = _scores(q, k, scale, softcap, HAS_SOFTCAP, IEEE)
        ok = _visible(offs_m, offs_n, vq, vk, dq, dk, L, window, CAUSAL, HAS_WINDOW)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(OUT + pid_bh.to(tl.int64) * L + offs_n, acc, mask=in_n)


def _doc_arrays(docs: Documents | None, B: int, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 [B, L] document start / end per token (one document per row when ``docs`` is None)."""
    if docs is None:
        return (torch.zeros(B, L, dtype=torch.int32, device=device),
                torch.full((B, L), L, dtype=torch.int32, device=device))
    return docs.start.to(torch.int32).contiguous(), docs.end.to(torch.int32).contiguous()


def attend_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    valid: torch.Tensor,
    docs: Documents | None,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    block: int | None,
    received: bool = True,
    tile_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Kernel 1 (+ output when ``v`` is given), then kernel 2 when ``received``.

    q: [B, Hq, L, Dh], k: [B, Hkv, L, Dh], v: [B, Hkv, L, Dv] or None (any strides; fp64 is
    computed in fp32), valid: bool [B, L]. ``block`` is the query and key tile (power of two
    >= 16). Returns (output [B, Hq, L, Dv] in v's dtype or None, fp32 [B, Hq, L] summed
    received mass with padding keys not yet zeroed, or None). ``tile_counts`` (int32 [2],
    for tests and benchmarks): the number of score tiles kernels 1 and 2 computed is added to it.
    """
    ok, why = available(q.device)
    if not ok:
        raise RuntimeError(f"backend='triton' is not available here: {why}")
    out_dtype = v.dtype if v is not None else None
    if q.dtype == torch.float64:
        q, k = q.float(), k.float()
        v = v.float() if v is not None else None
    B, Hq, L, Dh = q.shape
    Hkv = k.shape[1]
    BD = max(16, triton.next_power_of_2(Dh))
    Dv = v.shape[-1] if v is not None else 1
    BDV = max(16, triton.next_power_of_2(Dv))
    if block is None:
        block = 64 if max(BD, BDV) <= 128 else 32
    if triton.cdiv(L, block) > 65535:
        raise ValueError(f"q: sequence length {L} needs more than 65535 tiles of {block}; pass a larger block")
    valid_i = valid.to(torch.int8).contiguous()
    dstart, dend = _doc_arrays(docs, B, L, q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, L, Dv, dtype=q.dtype, device=q.device) if v is not None else None
    common = dict(
        L=L,
        Dh=Dh,
        Hq=Hq,
        G=Hq // Hkv,
        scale=float(scale),
        softcap=float(softcap) if softcap is not None else 1.0,
        window=int(window) if window is not None else 0,
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        # Triton's CPU interpreter computes bf16 dot products wrongly (triton 3.x): upcast there
        IEEE=q.dtype == torch.float32 or (q.device.type != "cuda" and q.dtype == torch.bfloat16),
        BD=BD,
        COUNT_TILES=tile_counts is not None,
    )
    tiles = tile_counts if tile_counts is not None else lse
    # heads on grid axis 0 (up to 2^31 - 1), tiles on axis 1 (up to 65535 tiles)
    grid = (B * Hq, triton.cdiv(L, block))
    vv = v if v is not None else k  # placeholder pointer when HAS_V is False
    oo = out if out is not None else lse[..., None]
    with torch.cuda.device(q.device) if q.device.type == "cuda" else _null():
        _fwd_kernel[grid](
            q, k, vv, valid_i, dstart, dend, lse, oo, tiles,
            *q.stride(), *k.stride(), *vv.stride(), *oo.stride(),
            Dv=Dv, HAS_V=v is not None, BM=block, BN=block, BDV=BDV, **common,
        )
        summed = None
        if received:
            summed = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
            _received_kernel[grid](
                q, k, valid_i, dstart, dend, lse, summed, tiles, *q.stride(), *k.stride(), BM=block, BN=block, **common,
            )
    if out is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out, summed


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
