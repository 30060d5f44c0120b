"""Front end of the attention-received scorer (reasoning importance in XTF)."""

from __future__ import annotations

import torch

from ._common import finish, valid_mask, validate_received_args


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
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
    (``reduce="mean_over_queries"``, the XTF default reading). Two tiled passes (row
    log-sum-exp, then per key tile the sum of ``exp(s - lse)``), so the extra memory is
    O(L) per head plus one tile, never ``[B, H, L, L]``. No autograd (scores only).

    Visibility (as in transformers' masks): query ``i`` sees key ``j`` when both are real
    tokens and ``j <= i`` (``causal``), further ``i - j < sliding_window`` (causal window of
    ``sliding_window`` keys, itself included); not causal: all keys, or
    ``|i - j| <= sliding_window``.

    Args:
        q: [B, Hq, L, Dh] queries (fp32/bf16/fp16/fp64, any strides), after RoPE.
        k: [B, Hkv, L, Dh] keys, q's dtype and device; Hq must be a multiple of Hkv
            (grouped-query attention: query head h reads key head h // (Hq // Hkv)).
        scale: logit scale; None -> Dh ** -0.5.
        attention_mask: [B, L] bool or 0/1 integer, 1 = real token (left or right padding);
            None = no padding.
        causal: causal (decoder) attention.
        sliding_window: int >= 1 or None (see above).
        softcap: attention-logit soft-capping ``s -> softcap * tanh(s / softcap)`` (Gemma 2),
            applied after scaling; None = off.
        reduce: ``"mean_over_queries"`` or ``"sum"``.
        backend: ``"auto"`` (Triton on CUDA, else the chunked torch path), ``"torch"``, or
            ``"triton"`` (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``).
        block: tile length (power of two >= 16); None picks one per backend.

    Returns:
        fp32 [B, Hq, L] on q's device. Padding keys get 0 (never NaN). Under
        ``"mean_over_queries"`` each real key's value lies in (0, 1]; under ``"sum"`` the
        values of a sequence add up to the number of real queries (per head).

    Raises:
        TypeError / ValueError: naming the argument, for bad shapes, dtypes or values.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    validate_received_args(q, k, scale, attention_mask, causal, sliding_window, softcap, reduce, backend, block)
    B, Hq, L, Dh = q.shape
    scale_f = float(scale) if scale is not None else Dh**-0.5
    valid = valid_mask(attention_mask, B, L, q.device)
    name = backend
    if name == "auto":
        name = "triton" if q.device.type == "cuda" and _triton_ok(q.device) else "torch"
    kwargs = dict(scale=scale_f, causal=causal, window=sliding_window, softcap=softcap, block=block)
    with torch.no_grad():
        if name == "triton":
            from .triton_impl import received_triton

            summed = received_triton(q.detach(), k.detach(), valid, **kwargs)
        else:
            from .torch_impl import received_torch

            summed = received_torch(q.detach(), k.detach(), valid, **kwargs)
        return finish(summed, valid, causal, sliding_window, reduce)


def _triton_ok(device: torch.device) -> bool:
    try:
        from .triton_impl import available
    except Exception:  # Triton not installed: fall back to torch
        return False
    return available(device)[0]
