"""Chunked torch implementation of attention received (any device; the CPU path).

Two passes over ``[T x T]`` tiles, so the extra memory is O(B * H * T^2) for the tile plus
O(B * H * L) for the row log-sum-exps, never ``[B, H, L, L]``:

1. per query tile, an online log-sum-exp over the key tiles it can see (optionally the
   attention output as well, flash-attention style, for callers that need it);
2. per key tile, ``sum_i exp(s_ij - lse_i)`` over the query tiles that can see it.

Tiles that no query/key pair of the visibility rule touches (above the causal diagonal, out
of the sliding window) are skipped.
"""

from __future__ import annotations

import torch

#: fp32 elements of one score tile (B * H * T * T) the default tile size aims for.
TILE_ELEMS = 1 << 20


def default_block(B: int, Hq: int, L: int) -> int:
    """Largest power-of-two tile in [16, 512] whose score tile fits :data:`TILE_ELEMS`."""
    t = 512
    while t > 16 and B * Hq * t * t > TILE_ELEMS:
        t //= 2
    # no point in a tile much longer than the sequence
    while t > 16 and t // 2 >= L:
        t //= 2
    return t


def key_range(q0: int, q1: int, L: int, causal: bool, window: int | None) -> tuple[int, int]:
    """[lo, hi) of the keys visible from any query in [q0, q1)."""
    if causal:
        lo = max(0, q0 - window + 1) if window is not None else 0
        return lo, q1
    if window is None:
        return 0, L
    return max(0, q0 - window), min(L, q1 + window)


def query_range(k0: int, k1: int, L: int, causal: bool, window: int | None) -> tuple[int, int]:
    """[lo, hi) of the queries that see any key in [k0, k1)."""
    if causal:
        hi = min(L, k1 - 1 + window) if window is not None else L
        return k0, hi
    if window is None:
        return 0, L
    return max(0, k0 - window), min(L, k1 + window)


def _allowed(
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    valid: torch.Tensor,
    causal: bool,
    window: int | None,
) -> torch.Tensor | None:
    """Bool [B, 1, 1, Tq, Tk]: query i in [q0, q1) sees key j in [k0, k1); None when all do."""
    # distances i - j range over [q0 - (k1 - 1), (q1 - 1) - k0]
    dmin, dmax = q0 - (k1 - 1), (q1 - 1) - k0
    if causal:
        geometric_all = dmin >= 0 and (window is None or dmax < window)
    else:
        geometric_all = window is None or (-window <= dmin and dmax <= window)
    vq, vk = valid[:, q0:q1], valid[:, k0:k1]
    if geometric_all and bool(vq.all()) and bool(vk.all()):
        return None
    dev = valid.device
    d = torch.arange(q0, q1, device=dev)[:, None] - torch.arange(k0, k1, device=dev)[None, :]
    if causal:
        ok = d >= 0
        if window is not None:
            ok = ok & (d < window)
    elif window is not None:
        ok = d.abs() <= window
    else:
        ok = torch.ones_like(d, dtype=torch.bool)
    ok = ok[None] & vq[:, :, None] & vk[:, None, :]
    return ok[:, None, None]


def _scores(
    qt: torch.Tensor, kt: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """qt [B, Hkv, G, Tq, D], kt [B, Hkv, Tk, D] -> scores [B, Hkv, G, Tq, Tk] (compute dtype)."""
    B, Hkv, G, Tq, D = qt.shape
    s = torch.matmul(qt.reshape(B, Hkv, G * Tq, D), kt.transpose(-1, -2))
    s = s.view(B, Hkv, G, Tq, -1).mul_(scale)
    if softcap is not None:
        s = s.div_(softcap).tanh_().mul_(softcap)
    return s


def row_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    block: int,
    v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pass 1: per-query log-sum-exp of the visible scores, and optionally the attention output.

    Args:
        q: [B, Hq, L, Dh]; k: [B, Hkv, L, Dh]; valid: bool [B, L]; v: [B, Hkv, L, Dv] or None.

    Returns:
        lse [B, Hkv, G, L] in the compute dtype (-inf for queries that see nothing, i.e.
        padding), and the output [B, Hq, L, Dv] in v's dtype (0 at such queries) or None.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.unflatten(1, (Hkv, G))
    lse = torch.empty(B, Hkv, G, L, dtype=cdt, device=q.device)
    out = None
    if v is not None:
        out = torch.empty(B, Hkv, G, L, v.shape[-1], dtype=v.dtype, device=q.device)
    for q0 in range(0, L, block):
        q1 = min(L, q0 + block)
        qt = qg[:, :, :, q0:q1].to(cdt)
        m = torch.full((B, Hkv, G, q1 - q0), float("-inf"), dtype=cdt, device=q.device)
        lsum = torch.zeros_like(m)
        acc = None
        if v is not None:
            acc = torch.zeros(B, Hkv, G, q1 - q0, v.shape[-1], dtype=cdt, device=q.device)
        lo, hi = key_range(q0, q1, L, causal, window)
        for k0 in range(lo, hi, block):
            k1 = min(hi, k0 + block)
            s = _scores(qt, k[:, :, k0:k1].to(cdt), scale, softcap)
            allowed = _allowed(q0, q1, k0, k1, valid, causal, window)
            if allowed is not None:
                s = s.masked_fill_(~allowed, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(m_safe[..., None]).exp_()
            alpha = torch.exp(m - m_safe)
            lsum = lsum * alpha + p.sum(-1)
            if acc is not None:
                vt = v[:, :, k0:k1].to(cdt)
                acc = acc * alpha[..., None] + torch.matmul(p, vt[:, :, None])
            m = m_new
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        lse[..., q0:q1] = m_safe + torch.log(lsum)
        if acc is not None:
            seen = lsum > 0
            o = acc / torch.where(seen, lsum, torch.ones_like(lsum))[..., None]
            out[:, :, :, q0:q1] = torch.where(seen[..., None], o, torch.zeros_like(o)).to(v.dtype)
    if out is not None:
        out = out.flatten(1, 2)
    return lse, out


def received_sum(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    block: int,
) -> torch.Tensor:
    """Pass 2: fp32 [B, Hq, L], the probability mass each key receives summed over queries."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cdt = lse.dtype
    qg = q.unflatten(1, (Hkv, G))
    out = torch.zeros(B, Hkv, G, L, dtype=cdt, device=q.device)
    for k0 in range(0, L, block):
        k1 = min(L, k0 + block)
        kt = k[:, :, k0:k1].to(cdt)
        acc = torch.zeros(B, Hkv, G, k1 - k0, dtype=cdt, device=q.device)
        lo, hi = query_range(k0, k1, L, causal, window)
        for q0 in range(lo, hi, block):
            q1 = min(hi, q0 + block)
            s = _scores(qg[:, :, :, q0:q1].to(cdt), kt, scale, softcap)
            p = s.sub_(lse[..., q0:q1, None]).exp_()
            allowed = _allowed(q0, q1, k0, k1, valid, causal, window)
            if allowed is not None:
                # padding queries have lse = -inf -> exp = inf there; masked_fill clears it
                p = p.masked_fill_(~allowed, 0.0)
            acc += p.sum(-2)
        out[..., k0:k1] = acc
    return out.flatten(1, 2).to(torch.float32)


def received_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    block: int | None,
) -> torch.Tensor:
    """Both passes; fp32 [B, Hq, L] summed received mass (padding keys not yet zeroed)."""
    B, Hq, L, _ = q.shape
    block = block or default_block(B, Hq, L)
    with torch.no_grad():
        lse, _ = row_lse(q, k, valid, scale=scale, causal=causal, window=window, softcap=softcap, block=block)
        return received_sum(
            q, k, lse, valid, scale=scale, causal=causal, window=window, softcap=softcap, block=block
        )
