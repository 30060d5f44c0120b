"""Front end of the attention-received scorer (reasoning importance in XTF)."""

from __future__ import annotations

from typing import Any

import torch

from ..documents import Documents, documents
from ._common import finish, valid_mask, validate_received_args
from .backends import resolve_attend


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    valid: torch.Tensor,
    docs: Documents | None,
    *,
    backend: str,
    received: bool,
    **kw: Any,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(output or None, fp32 [B, Hq, L] summed received mass or None) from the chosen backend."""
    _, attend = resolve_attend(backend, q.device)
    with torch.no_grad():
        return attend(q.detach(), k.detach(), None if v is None else v.detach(), valid, docs,
                      received=received, **kw)


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    reduce: str = "mean_over_queries",
    backend: str = "auto",
    block: int | None = None,
) -> torch.Tensor:
    """Attention probability each key position receives, without the [L, L] probabilities.

    With ``P[b, h, i, j] = softmax_j(cap(q_i . k_j * scale))`` over the keys query ``i`` can
    see, returns ``R[b, h, j] = sum_i P[b, h, i, j]`` over the real queries ``i`` that see key
    ``j`` (``reduce="sum"``), or that sum divided by the number of such queries
    (``reduce="mean_over_queries"``, the XTF default reading). No autograd (scores only);
    extra memory O(L) per head plus one block, never ``[B, H, L, L]``.

    Visibility (as in transformers' masks): query ``i`` sees key ``j`` when both are real
    tokens, both are in the same document, and ``j <= i`` (``causal``), further
    ``i - j < sliding_window`` (causal window of ``sliding_window`` keys, itself included);
    not causal: all keys of the document, or ``|i - j| <= sliding_window``.

    Documents (packed rows, block-diagonal attention): a document starts at the first
    position of every row and at every position whose ``position_ids`` is 0 (as written by
    transformers' ``DataCollatorWithFlattening`` and TRL's padding-free packing), or at every
    offset of ``cu_seqlens``. Blocks of keys and queries that lie entirely in other documents
    are skipped, not masked. With ``reduce="mean_over_queries"`` a key's sum is divided by the
    number of real queries *of its document* that see it.

    Args:
        q: [B, Hq, L, Dh] queries (fp32/bf16/fp16/fp64, any strides), after RoPE.
        k: [B, Hkv, L, Dh] keys, q's dtype and device; Hq must be a multiple of Hkv
            (grouped-query attention: query head h reads key head h // (Hq // Hkv)).
        scale: logit scale; None -> Dh ** -0.5.
        attention_mask: [B, L] bool or 0/1 integer, 1 = real token (left or right padding);
            None = no padding.
        position_ids: [B, L] or [1, L] integer positions on q's device (packed rows: each
            document counts from 0); None = one document per row.
        cu_seqlens: 1-D integer offsets of the documents in the flattened ``B * L`` tokens,
            from 0 to ``B * L`` (flash-attention's varlen convention); a document may not cross
            rows. Pass at most one of ``position_ids`` and ``cu_seqlens``.
        causal: causal (decoder) attention.
        sliding_window: int >= 1 or None (see above).
        softcap: attention-logit soft-capping ``s -> softcap * tanh(s / softcap)`` (Gemma 2),
            applied after scaling; None = off.
        reduce: ``"mean_over_queries"`` or ``"sum"``.
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"torch"`` (one pass over query
            blocks: exact row softmax, then column sums), or ``"triton"`` (two kernels: row
            log-sum-exp, then per key tile the sum of ``exp(s - lse)``; CUDA, or the CPU
            interpreter with ``TRITON_INTERPRET=1``).
        block: tile length (power of two >= 16); None picks one per backend.

    Returns:
        fp32 [B, Hq, L] on q's device. Padding keys get 0 (never NaN). Under
        ``"mean_over_queries"`` each real key's value lies in (0, 1]; under ``"sum"`` the
        values of a document add up to its number of real queries (per head).

    Raises:
        TypeError / ValueError: naming the argument, for bad shapes, dtypes or values.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    validate_received_args(
        q, k, scale, attention_mask, causal, sliding_window, softcap, reduce, backend, block, position_ids, cu_seqlens
    )
    B, Hq, L, Dh = q.shape
    valid = valid_mask(attention_mask, B, L, q.device)
    docs = documents(position_ids, cu_seqlens, B, L, q.device)
    _, summed = _run(
        q, k, None, valid, docs, backend=backend, received=True,
        scale=float(scale) if scale is not None else Dh**-0.5, causal=causal, window=sliding_window,
        softcap=softcap, block=block,
    )
    return finish(summed, valid, causal, sliding_window, reduce, docs)


def attention_with_received(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    reduce: str | None = "mean_over_queries",
    backend: str = "auto",
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention output and the attention received, sharing the softmax.

    Same visibility and arguments as :func:`attention_received`, plus values ``v``
    [B, Hkv, L, Dv] (q's dtype and device). The torch backend computes both from one pass
    over ``Q K^T`` (exact row softmax per query block; the output is ``P @ V``); the Triton
    backend computes the output and the row log-sum-exp in one flash-attention kernel and
    reuses that log-sum-exp in the received-mass kernel, so the scores cost one extra pass
    over ``Q K^T`` instead of two.

    Args:
        reduce: as in :func:`attention_received`, or None for the output alone.

    Returns:
        (output [B, Hq, L, Dv] in v's dtype, 0 at padding queries;
        fp32 [B, Hq, L] received attention, or None when ``reduce`` is None). No autograd.
    """
    validate_received_args(
        q, k, scale, attention_mask, causal, sliding_window, softcap, reduce or "sum", backend, block,
        position_ids, cu_seqlens,
    )
    docs = documents(position_ids, cu_seqlens, q.shape[0], q.shape[2], q.device)
    return attention_with_documents(
        q, k, v, docs, scale=scale, attention_mask=attention_mask, causal=causal, sliding_window=sliding_window,
        softcap=softcap, reduce=reduce, backend=backend, block=block,
    )


def attention_with_documents(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: Documents | None,
    *,
    scale: float | None,
    attention_mask: torch.Tensor | None,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    reduce: str | None,
    backend: str,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`attention_with_received` with the documents already resolved (see :func:`xtf_kernels.documents.documents`).

    For callers that run many layers on one batch (the Hugging Face collector): the document
    layout is computed once per forward pass instead of once per layer.
    """
    validate_received_args(
        q, k, scale, attention_mask, causal, sliding_window, softcap, reduce or "sum", backend, block
    )
    _validate_values(v, k)
    B, Hq, L, Dh = q.shape
    if docs is not None and tuple(docs.start.shape) != (B, L):
        raise ValueError(f"docs: expected a document layout of shape {(B, L)}, got {tuple(docs.start.shape)}")
    valid = valid_mask(attention_mask, B, L, q.device)
    out, summed = _run(
        q, k, v, valid, docs, backend=backend, received=reduce is not None,
        scale=float(scale) if scale is not None else Dh**-0.5, causal=causal, window=sliding_window,
        softcap=softcap, block=block,
    )
    if summed is None:
        return out, None
    return out, finish(summed, valid, causal, sliding_window, reduce, docs)


def _validate_values(v: Any, k: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v: expected a torch.Tensor [B, Hkv, L, Dv], got {type(v).__name__}")
    if v.dtype != k.dtype:
        raise TypeError(f"v: expected q's dtype {k.dtype}, got {v.dtype}")
    if v.device != k.device:
        raise ValueError(f"v: expected q's device {k.device}, got {v.device}")
    if v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] < 1:
        raise ValueError(f"v: expected shape [B, Hkv, L, Dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
