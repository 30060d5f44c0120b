"""Attention received per key position (XTF reasoning importance), without [L, L] matrices.

Public API::

    from xtf_kernels.attention import (
        attention_received,            # q, k -> fp32 [B, Hq, L]
        attention_with_received,       # q, k, v -> (output [B, Hq, L, Dv], fp32 [B, Hq, L])
        ReceivedAttentionCollector,    # transformers AttentionInterface plug-in
        collect_received_attention,    # model, input_ids, attention_mask -> fp32 [B, L]
    )
"""

from .hf import ATTN_IMPLEMENTATION, ReceivedAttentionCollector, collect_received_attention
from .received import attention_received, attention_with_received

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ReceivedAttentionCollector",
    "attention_received",
    "attention_with_received",
    "collect_received_attention",
]
