"""Input validation and the visibility rule shared by the torch and Triton code.

Visibility (the same rule as transformers' ``masking_utils``): query ``i`` sees key ``j`` when
both are real tokens (``attention_mask`` 1), both lie in the same document (packed rows: the
:class:`~xtf_kernels.documents.Documents` of ``position_ids`` / ``cu_seqlens``), and

* causal, no window: ``j <= i``;
* causal, ``sliding_window = W``: ``0 <= i - j < W`` (``W`` keys per query, itself included);
* not causal, no window: always;
* not causal, ``sliding_window = W``: ``|i - j| <= W``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..documents import Documents

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCES = ("mean_over_queries", "sum")
ATTN_BACKENDS = ("auto", "torch", "triton")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_received_args(
    q: Any,
    k: Any,
    scale: Any,
    attention_mask: Any,
    causal: Any,
    sliding_window: Any,
    softcap: Any,
    reduce: Any,
    backend: Any,
    block: Any,
    position_ids: Any = None,
    cu_seqlens: Any = None,
) -> None:
    """Raise TypeError/ValueError naming the argument for anything attention_received cannot take."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D [B, H, L, Dh] tensor, got shape {_shape(t)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k: expected q's device {q.device}, got {k.device}")
    B, Hq, L, Dh = q.shape
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != Dh:
        raise ValueError(
            f"k: expected shape [B={B}, Hkv, L={L}, Dh={Dh}] matching q {_shape(q)}, got {_shape(k)}"
        )
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"k: expected a number of heads dividing q's {Hq} heads (grouped-query attention), got {Hkv}"
        )
    if B < 1 or L < 1 or Dh < 1 or Hq < 1:
        raise ValueError(f"q: expected non-empty [B, H, L, Dh], got shape {_shape(q)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a finite float > 0, got {scale!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask: expected a torch.Tensor [B, L] or None, got {type(attention_mask).__name__}"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(
                f"attention_mask: expected a bool or integer tensor (1 = real token), got {attention_mask.dtype}"
            )
        if _shape(attention_mask) != (B, L):
            raise ValueError(f"attention_mask: expected shape [B, L] = {(B, L)}, got {_shape(attention_mask)}")
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask: expected q's device {q.device}, got {attention_mask.device}")
        if attention_mask.dtype != torch.bool:
            bad = (attention_mask != 0) & (attention_mask != 1)
            if bool(bad.any()):
                raise ValueError("attention_mask: expected values 0 (padding) or 1 (real token)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window: expected an int or None, got {type(sliding_window).__name__}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window: expected an int >= 1, got {sliding_window}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap: expected a float or None, got {type(softcap).__name__}")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap: expected a finite float > 0, got {softcap!r}")
    if reduce not in REDUCES:
        raise ValueError(f"reduce: expected one of {REDUCES}, got {reduce!r}")
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"backend: expected one of {ATTN_BACKENDS}, got {backend!r}")
    if block is not None:
        if isinstance(block, bool) or not isinstance(block, int):
            raise TypeError(f"block: expected an int or None, got {type(block).__name__}")
        if block < 16 or block & (block - 1):
            raise ValueError(f"block: expected a power of two >= 16, got {block}")
    validate_documents(position_ids, cu_seqlens, B, L, q.device)


def _int_tensor(name: str, t: Any, shape_text: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {shape_text} or None, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")


def validate_documents(position_ids: Any, cu_seqlens: Any, B: int, L: int, device: torch.device) -> None:
    """Check ``position_ids`` ([B, L] or [1, L] integers) / ``cu_seqlens`` (1-D offsets over B * L)."""
    if position_ids is not None and cu_seqlens is not None:
        raise ValueError("position_ids: pass either position_ids or cu_seqlens, not both")
    if position_ids is not None:
        _int_tensor("position_ids", position_ids, "[B, L]")
        if position_ids.dim() != 2 or position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
            raise ValueError(
                f"position_ids: expected shape [B, L] = {(B, L)} (or [1, L]), got {_shape(position_ids)}"
            )
        if position_ids.device != device:
            raise ValueError(f"position_ids: expected q's device {device}, got {position_ids.device}")
    if cu_seqlens is not None:
        _int_tensor("cu_seqlens", cu_seqlens, "[n_docs + 1]")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor of >= 2 offsets, got shape {_shape(cu_seqlens)}")
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        if int(cu[0]) != 0 or int(cu[-1]) != B * L or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to B * L = {B * L} (the flattened "
                f"tokens), got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}"
            )
        rows = torch.arange(1, B, dtype=torch.int64) * L
        if B > 1 and not bool(torch.isin(rows, cu).all()):
            raise ValueError(f"cu_seqlens: documents may not cross rows; every row start b * {L} must be an offset")


def valid_mask(attention_mask: torch.Tensor | None, B: int, L: int, device: torch.device) -> torch.Tensor:
    """Bool [B, L]: True at real tokens."""
    if attention_mask is None:
        return torch.ones(B, L, dtype=torch.bool, device=device)
    return attention_mask.to(torch.bool)


def query_counts(
    valid: torch.Tensor, causal: bool, sliding_window: int | None, docs: Documents | None = None
) -> torch.Tensor:
    """fp32 [B, L]: for each real key ``j``, the number of real queries that see it (0 at padding).

    Only queries of ``j``'s document count. O(B * L) memory: a prefix sum over the real-token mask.
    """
    B, L = valid.shape
    dev = valid.device
    csum = torch.zeros(B, L + 1, dtype=torch.int64, device=dev)
    csum[:, 1:] = torch.cumsum(valid.to(torch.int64), dim=1)
    j = torch.arange(L, device=dev).expand(B, L)
    if causal:
        lo = j
        hi = j + (sliding_window - 1 if sliding_window is not None else L)
    else:
        lo = j - (sliding_window if sliding_window is not None else L)
        hi = j + (sliding_window if sliding_window is not None else L)
    if docs is not None:
        lo = torch.maximum(lo, docs.start)
        hi = torch.minimum(hi, docs.end - 1)
    lo = lo.clamp(0, L - 1)
    hi = hi.clamp(0, L - 1)
    cnt = csum.gather(1, hi + 1) - csum.gather(1, lo)
    return torch.where(valid, cnt, torch.zeros_like(cnt)).to(torch.float32)


def finish(
    summed: torch.Tensor,
    valid: torch.Tensor,
    causal: bool,
    sliding_window: int | None,
    reduce: str,
    docs: Documents | None = None,
) -> torch.Tensor:
    """Zero the padding keys of ``summed`` [B, H, L] fp32 and divide by the query counts if asked."""
    summed = torch.where(valid[:, None, :], summed, torch.zeros((), dtype=summed.dtype, device=summed.device))
    if reduce == "sum":
        return summed
    cnt = query_counts(valid, causal, sliding_window, docs)
    return summed / cnt.clamp_min(1.0)[:, None, :]
