"""Torch implementation of attention received (any device; the CPU path), one pass over Q K^T.

The queries are processed in blocks of ``T`` rows. For a block, the scores against every key
the block can see (``[B, H, T, Lk]``) are computed with one GEMM, soft-capped and masked, and
turned into exact row softmax probabilities ``P`` (``torch.softmax``: the row log-sum-exp is
that of the complete row, so no online rescaling and no second pass). Then

* the attention received is ``P`` summed over the block's queries, added to the keys;
* optionally the attention output is ``P @ V`` (the layer's normal output).

So the layer output and the scores cost one ``Q K^T`` GEMM, one softmax, one ``P V`` GEMM and
one column sum, i.e. a forward pass plus a reduction. Extra memory: two ``[B, H, T, Lk]`` blocks
(``T`` chosen so one fits :data:`ROW_BLOCK_BYTES`) plus O(B * H * L): never ``[B, H, L, L]``.

Key ranges skip what no query of the block can see: keys after the block (causal), outside
the sliding window, and in other documents. Packed rows are processed one at a time, with
query blocks aligned to their documents (a long document's blocks never reach into another
document; runs of short documents share a block), so blocks of other documents are never
computed.
"""

from __future__ import annotations

import torch

from ..documents import Documents

#: bytes of one fp32 score block ``[rows, H, T, Lk]`` that the default block size aims for.
ROW_BLOCK_BYTES = 32 << 20


def default_block(rows: int, Hq: int, L: int) -> int:
    """Largest power-of-two query block in [16, 512] with a score block that fits
    :data:`ROW_BLOCK_BYTES` and at most ``L / 32`` rows.

    Short blocks waste little above the causal diagonal (a block computes its full last
    ``T x T`` square) and keep the block in cache; on a CPU core blocks of 32-256 rows ran
    fastest at L = 1024-4096 (8 heads, Dh = 64).
    """
    t = 512
    while t > 16 and (rows * Hq * t * L * 4 > ROW_BLOCK_BYTES or 32 * t > L):
        t //= 2
    return t


class _RowsPlan:
    """Host-side facts about a group of rows: where the real tokens and the documents are."""

    def __init__(self, valid: torch.Tensor, docs: Documents | None, L: int) -> None:
        csum = torch.zeros(valid.shape[0], L + 1, dtype=torch.int64, device=valid.device)
        csum[:, 1:] = valid.to(torch.int64).cumsum(1)
        self.L = L
        self.csum = csum.tolist()
        self.start = None if docs is None else docs.start.tolist()
        self.end = None if docs is None else docs.end.tolist()

    def query_blocks(self, block: int) -> list[tuple[int, int]]:
        """[q0, q1) query blocks: fixed tiles, or (documents: one row) tiles aligned to documents.

        With documents, a long document gets its own blocks, and a run of consecutive short
        documents (each < block / 4 tokens, together <= block / 2) shares one block, so no
        block reaches into a document it does not need and tiny documents do not cost one
        block each.
        """
        L = self.L
        if self.start is None:
            return [(q0, min(L, q0 + block)) for q0 in range(0, L, block)]
        end = self.end[0]
        out: list[tuple[int, int]] = []
        i = 0
        while i < L:
            e = end[i]
            if e - i >= block // 4:
                out.extend((s, min(s + block, e)) for s in range(i, e, block))
                i = e
                continue
            j = e
            while j < L and end[j] - i <= block // 2 and end[j] - j < block // 4:
                j = end[j]
            out.append((i, j))
            i = j
        return out

    def n_valid(self, a: int, b: int) -> list[int]:
        return [c[b] - c[a] for c in self.csum]

    def key_range(self, q0: int, q1: int, causal: bool, window: int | None) -> tuple[int, int]:
        """[lo, hi) of the keys any query in [q0, q1) of any row of the group can see.

        The range always holds every query's own position (see :func:`_visible_block`).
        """
        if causal:
            lo = max(0, q0 - window + 1) if window is not None else 0
            hi = q1
        elif window is None:
            lo, hi = 0, self.L
        else:
            lo, hi = max(0, q0 - window), min(self.L, q1 + window)
        if self.start is not None:
            lo = max(lo, min(s[q0] for s in self.start))
            hi = min(hi, max(e[q1 - 1] for e in self.end))
        return lo, hi

    def only_geometry(self, q0: int, q1: int, lo: int, hi: int, causal: bool, window: int | None) -> bool:
        """True when, in [lo, hi), everything is visible but for the causal diagonal block."""
        a, b = min(lo, q0), max(hi, q1)
        if any(n != b - a for n in self.n_valid(a, b)):
            return False
        if self.start is not None and any(s[a] != s[b - 1] for s in self.start):
            return False
        if window is None:
            return True
        if causal:
            return (q1 - 1) - lo < window
        return (q1 - 1) - lo <= window and hi - 1 - q0 <= window


def _visible_block(
    q0: int,
    q1: int,
    lo: int,
    hi: int,
    valid: torch.Tensor,
    docs: Documents | None,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """Bool [rows, 1, 1, Tq, Tk]: query i in [q0, q1) sees key j in [lo, hi), or i == j.

    The diagonal keeps a padding query's row finite (it then sees only itself); its output is
    zeroed and its own key is a padding key, zeroed by the caller.
    """
    dev = valid.device
    d = torch.arange(q0, q1, device=dev)[:, None] - torch.arange(lo, hi, device=dev)[None, :]
    if causal:
        ok = d >= 0
        if window is not None:
            ok = ok & (d < window)
    elif window is not None:
        ok = d.abs() <= window
    else:
        ok = torch.ones_like(d, dtype=torch.bool)
    ok = ok[None] & valid[:, q0:q1, None] & valid[:, None, lo:hi]
    if docs is not None:
        ok = ok & (docs.start[:, q0:q1, None] == docs.start[:, None, lo:hi])
    ok = ok | (d == 0)[None]
    return ok[:, None, None]


def _attend_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    valid: torch.Tensor,
    docs: Documents | None,
    out: torch.Tensor | None,
    summed: torch.Tensor | None,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    block: int,
) -> None:
    """One group of rows: q [b, Hkv, G, L, D] (any dtype), k/v [b, Hkv, L, *] (compute dtype).

    Writes the output rows into ``out`` [b, Hkv, G, L, Dv] and adds the received mass to
    ``summed`` [b, Hkv, G, L] (compute dtype), each when given.
    """
    Bg, Hkv, G, L, D = q.shape
    cdt = k.dtype
    plan = _RowsPlan(valid, docs, L)
    above = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)  # causal: keys after the query
    for q0, q1 in plan.query_blocks(block):
        n = q1 - q0
        if max(plan.n_valid(q0, q1)) == 0:
            continue  # only padding queries: output stays 0, nothing received
        lo, hi = plan.key_range(q0, q1, causal, window)
        qt = q[:, :, :, q0:q1].to(cdt).reshape(Bg, Hkv, G * n, D)
        s = torch.matmul(qt, k[:, :, lo:hi].transpose(-1, -2)).view(Bg, Hkv, G, n, hi - lo)
        s.mul_(scale)
        if softcap is not None:
            s.div_(softcap).tanh_().mul_(softcap)
        if plan.only_geometry(q0, q1, lo, hi, causal, window):
            if causal:  # hi == q1: mask above the diagonal of the last n keys
                s[..., q0 - lo :].masked_fill_(above[:n, :n], float("-inf"))
        else:
            s.masked_fill_(~_visible_block(q0, q1, lo, hi, valid, docs, causal, window), float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        if out is not None:
            o = torch.matmul(p.view(Bg, Hkv, G * n, hi - lo), v[:, :, lo:hi]).view(Bg, Hkv, G, n, -1)
            vq = valid[:, q0:q1]
            if not bool(vq.all()):
                o.masked_fill_(~vq[:, None, None, :, None], 0.0)
            out[:, :, :, q0:q1] = o.to(out.dtype)
        if summed is not None:
            summed[..., lo:hi] += p.sum(dim=-2)


def attend_torch(
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Attention output and/or summed received mass in one pass (no autograd).

    Args:
        q: [B, Hq, L, Dh]; k: [B, Hkv, L, Dh]; v: [B, Hkv, L, Dv] or None (no output);
        valid: bool [B, L]; docs: document layout or None (one document per row).
        block: query rows per block (power of two >= 16); None = :func:`default_block`.
        received: whether to accumulate the received mass.

    Returns:
        (output [B, Hq, L, Dv] in v's dtype, 0 at padding queries, or None;
        fp32 [B, Hq, L] summed received mass, padding keys not yet zeroed, or None).
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = 1 if docs is not None else B
    block = block or default_block(rows, Hq, L)
    with torch.no_grad():
        kc = k.to(cdt)
        vc = v.to(cdt) if v is not None else None
        qg = q.unflatten(1, (Hkv, G))
        out = torch.zeros(B, Hkv, G, L, v.shape[-1], dtype=v.dtype, device=q.device) if v is not None else None
        summed = torch.zeros(B, Hkv, G, L, dtype=cdt, device=q.device) if received else None
        groups = [slice(0, B)] if docs is None else [slice(b, b + 1) for b in range(B)]
        for sl in groups:
            _attend_rows(
                qg[sl], kc[sl], None if vc is None else vc[sl], valid[sl], None if docs is None else docs.rows(sl),
                None if out is None else out[sl], None if summed is None else summed[sl],
                scale=scale, causal=causal, window=window, softcap=softcap, block=block,
            )
    return (
        None if out is None else out.flatten(1, 2),
        None if summed is None else summed.flatten(1, 2).to(torch.float32),
    )
