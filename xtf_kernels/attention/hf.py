"""Hugging Face plug-in: attention received, collected during a normal forward pass.

One function is registered in transformers' attention registry under the name
:data:`ATTN_IMPLEMENTATION` (``AttentionInterface.register``), with a mask builder
(``AttentionMaskInterface.register``). Every model whose attention layers dispatch through
``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral, Gemma 2, ... ) then calls it with its own
query/key/value states (after RoPE), ``scaling``, ``sliding_window``, ``softcap`` and the
packed-batch keyword arguments (``position_ids``, ``cu_seq_lens_q``). While a
:class:`ReceivedAttentionCollector` is attached, the function computes the layer's output and
its received attention together (``attention_with_received``: one shared softmax), with
the collector's padding mask and the documents of packed rows (block-diagonal attention), and
adds the head-averaged scores to the collector. The mask builder then returns no mask (the
visibility comes from the 2-D mask and the documents), so no ``[B, 1, L, L]`` mask is built.
Outside a collector the function is plain SDPA (with transformers' SDPA mask).

No per-model code: scaling, windows, soft-capping and GQA come from the call's arguments and
the attention module's attributes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..documents import Documents, documents
from ._common import ATTN_BACKENDS, REDUCES, validate_documents
from .received import attention_with_documents

#: Name under which the collecting attention function is registered in transformers.
ATTN_IMPLEMENTATION = "xtf_received"

_state = threading.local()
_registered = False
_reg_lock = threading.Lock()


def _stack() -> list[ReceivedAttentionCollector]:
    st = getattr(_state, "stack", None)
    if st is None:
        st = _state.stack = []
    return st


def _mask_builder(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask, or None while a collector is attached (it never reads the mask)."""
    if _stack():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the collecting attention function (idempotent); returns its name."""
    global _registered
    with _reg_lock:
        if not _registered:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            AttentionInterface.register(ATTN_IMPLEMENTATION, _xtf_attention_forward)
            AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask_builder)
            _registered = True
    return ATTN_IMPLEMENTATION


def _module_setting(module: torch.nn.Module, kwargs: dict[str, Any], name: str, attr: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return getattr(module, attr, default)


def _xtf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function (transformers' calling convention).

    query [B, Hq, Lq, Dh], key/value [B, Hkv, Lk, Dh]; returns ([B, Lq, Hq, Dv], None).
    """
    stack = _stack()
    if stack:
        return stack[-1]._forward(module, query, key, value, kwargs), None
    if kwargs.get("softcap") is not None:
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION}: attention with soft-capping runs only inside "
            "ReceivedAttentionCollector.attach(model); use attn_implementation='eager' otherwise"
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class ReceivedAttentionCollector:
    """Accumulates per-layer received attention during a Hugging Face forward pass.

    Usage::

        col = ReceivedAttentionCollector(attention_mask)        # [B, L], 1 = real token
        with torch.no_grad(), col.attach(model):
            model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        scores = col.result()                                   # fp32 [B, L]

    ``attach`` switches the model to the registered attention implementation and restores
    the previous one on exit (also on error). Every attention layer then computes its output
    with :func:`~xtf_kernels.attention.attention_with_received` (the collector's padding mask; documents of packed
    rows); each selected layer contributes the mean over its query heads of the received
    attention; :meth:`result` averages over the layers that contributed.

    Packed rows: the documents come from ``position_ids`` / ``cu_seqlens`` given here, else
    from the ``cu_seq_lens_q`` or 2-D ``position_ids`` that transformers passes to the
    attention function (a document starts where ``position_ids`` is 0). Under the collector
    every layer's attention is block-diagonal over those documents, whatever mask transformers
    would have built.

    Args:
        attention_mask: [B, L] bool/0-1 integer (1 = real token), or None (no padding). It
            must be the mask the model is called with.
        layers: layer indices to aggregate (negative counts from the end, resolved against
            the model's ``num_hidden_layers`` on attach); None = all layers.
        reduce: ``"mean_over_queries"`` (default) or ``"sum"``, see :func:`attention_received`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the scorer.
        position_ids: [B, L] / [1, L] integer positions of the batch (packed rows), or None.
        cu_seqlens: 1-D document offsets over the flattened ``B * L`` tokens, or None.
    """

    def __init__(
        self,
        attention_mask: torch.Tensor | None,
        *,
        layers: Sequence[int] | None = None,
        reduce: str = "mean_over_queries",
        backend: str = "auto",
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> None:
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(
                    f"attention_mask: expected a torch.Tensor [B, L] or None, got {type(attention_mask).__name__}"
                )
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask: expected shape [B, L], got {tuple(attention_mask.shape)}")
            if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
                raise TypeError(
                    f"attention_mask: expected a bool or integer tensor (1 = real token), got {attention_mask.dtype}"
                )
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
                raise TypeError(f"layers: expected a sequence of int or None, got {type(layers).__name__}")
            if len(layers) == 0:
                raise ValueError("layers: expected at least one layer index, got an empty sequence")
            for li in layers:
                if isinstance(li, bool) or not isinstance(li, int):
                    raise TypeError(f"layers: expected int layer indices, got {li!r}")
        if reduce not in REDUCES:
            raise ValueError(f"reduce: expected one of {REDUCES}, got {reduce!r}")
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"backend: expected one of {ATTN_BACKENDS}, got {backend!r}")
        if position_ids is not None and cu_seqlens is not None:
            raise ValueError("position_ids: pass either position_ids or cu_seqlens, not both")
        for name, t in (("position_ids", position_ids), ("cu_seqlens", cu_seqlens)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        self.attention_mask = attention_mask
        self.position_ids = position_ids
        self.cu_seqlens = cu_seqlens
        self._docs_src: tuple[Any, ...] | None = None
        self._docs: Documents | None = None
        self._docs_inputs: tuple[Any, ...] = ()
        self.layers_requested = None if layers is None else list(layers)
        self.reduce = reduce
        self.backend = backend
        self._layers: set[int] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the scores collected so far."""
        self._sum: torch.Tensor | None = None
        self._seen: list[int] = []
        self._calls = 0

    def _resolve_layers(self, model: torch.nn.Module) -> None:
        if self.layers_requested is None:
            self._layers = None
            return
        n = _num_layers(model)
        out = set()
        for li in self.layers_requested:
            idx = li + n if (li < 0 and n is not None) else li
            if idx < 0 or (n is not None and idx >= n):
                raise ValueError(f"layers: index {li} out of range for a model with {n} layers")
            out.add(idx)
        self._layers = out

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[ReceivedAttentionCollector]:
        """Route ``model``'s attention through the collector for the duration of the block."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "set_attn_implementation"):
            raise TypeError(
                f"model: expected a transformers PreTrainedModel, got {type(model).__name__}"
            )
        self._resolve_layers(model)
        name = register()
        previous = config._attn_implementation
        model.set_attn_implementation(name)
        if config._attn_implementation != name:
            model.set_attn_implementation(previous)
            raise TypeError(
                f"model: {type(model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface, so received attention cannot be collected"
            )
        stack = _stack()
        stack.append(self)
        try:
            yield self
        finally:
            stack.remove(self)
            model.set_attn_implementation(previous)

    def _documents(self, kwargs: dict[str, Any], B: int, L: int, device: torch.device) -> Documents | None:
        """Documents of this batch (computed once per forward: every layer passes the same tensors)."""
        pos, cu = self.position_ids, self.cu_seqlens
        if pos is None and cu is None:
            cu = kwargs.get("cu_seq_lens_q")
            if cu is None:
                p = kwargs.get("position_ids")
                # 2-D positions only (multimodal rotary positions [3, B, L] do not mark documents)
                if isinstance(p, torch.Tensor) and p.dim() == 2 and p.shape[-1] == L:
                    pos = p
        if pos is None and cu is None:
            return None
        # same tensors (identity and in-place version) -> same documents; a new batch recomputes
        src = (_tensor_key(pos), _tensor_key(cu), B, L, device)
        if self._docs_src == src:
            return self._docs
        pos_d = None if pos is None else pos.to(device)
        validate_documents(pos_d, cu, B, L, device)
        self._docs = documents(pos_d, cu, B, L, device)
        self._docs_src = src
        self._docs_inputs = (pos, cu)  # keeps the keyed tensors alive, so their ids stay unique
        return self._docs

    def _forward(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """One attention layer: its output [B, Lq, Hq, Dv]; scores added when the layer is selected."""
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = self._calls
        self._calls += 1
        selected = self._layers is None or idx in self._layers
        if kwargs.get("dropout", 0.0):
            raise RuntimeError(f"{ATTN_IMPLEMENTATION}: attention dropout is not supported; call model.eval() first")
        B, _, Lq, _ = query.shape
        if key.shape[2] != Lq:
            raise RuntimeError(
                f"{ATTN_IMPLEMENTATION}: expected as many keys as queries (no KV cache), got "
                f"{key.shape[2]} keys for {Lq} queries; call the model with use_cache=False"
            )
        mask = self.attention_mask
        if mask is not None:
            if tuple(mask.shape) != (B, Lq):
                raise ValueError(
                    f"attention_mask: expected shape {(B, Lq)} (the batch the model ran on), "
                    f"got {tuple(mask.shape)}"
                )
            mask = mask.to(query.device)
        docs = self._documents(kwargs, B, Lq, query.device)
        scaling = kwargs.get("scaling")
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = bool(getattr(module, "is_causal", True))
        softcap = kwargs.get("softcap")
        out, r = attention_with_documents(
            query,
            key,
            value,
            docs,
            scale=float(scaling) if scaling is not None else None,
            attention_mask=mask,
            causal=causal,
            sliding_window=_module_setting(module, kwargs, "sliding_window", "sliding_window", None),
            softcap=float(softcap) if softcap is not None else None,
            reduce=self.reduce if selected else None,
            backend=self.backend,
        )
        if r is not None:
            layer_score = r.mean(dim=1)
            self._sum = layer_score if self._sum is None else self._sum + layer_score.to(self._sum.device)
            self._seen.append(idx)
        return out.transpose(1, 2).contiguous()

    @property
    def layers_seen(self) -> list[int]:
        """Layer indices that contributed, in call order."""
        return list(self._seen)

    def result(self) -> torch.Tensor:
        """fp32 [B, L]: received attention averaged over heads and the contributing layers.

        Padding positions are 0. Raises RuntimeError when nothing was collected or a
        requested layer never ran.
        """
        if self._sum is None:
            raise RuntimeError(
                "ReceivedAttentionCollector: no attention layer reported scores; run the model "
                "inside `with collector.attach(model):`"
            )
        if self._layers is not None:
            missing = sorted(self._layers - set(self._seen))
            if missing:
                raise RuntimeError(f"layers: requested layers {missing} never ran attention")
        return self._sum / len(self._seen)


def _tensor_key(t: torch.Tensor | None) -> tuple[int, int] | None:
    return None if t is None else (id(t), t._version)


def _num_layers(model: torch.nn.Module) -> int | None:
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        config = get_text()
    n = getattr(config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def collect_received_attention(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    layers: Sequence[int] | None = None,
    reduce: str = "mean_over_queries",
    backend: str = "auto",
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reasoning-importance scores of every token: one no-grad forward of ``model``.

    Runs the model's decoder (its ``base_model``: no LM-head logits are computed) with the
    collecting attention function and returns the received attention per position,
    averaged over heads and over the selected layers. The model's attention
    implementation and train/eval mode are restored afterwards.

    Args:
        model: a transformers ``PreTrainedModel`` (e.g. ``*ForCausalLM``) whose attention
            goes through ``ALL_ATTENTION_FUNCTIONS``.
        input_ids: int64 [B, L] token ids.
        attention_mask: [B, L] bool/0-1 integer (1 = real token; left or right padding) or
            None (no padding).
        layers: layer indices to average (negative from the end); None = all.
        reduce: ``"mean_over_queries"`` (attention received divided by the number of real
            queries that can see the key) or ``"sum"`` (raw summed mass).
        backend: scorer backend, see :func:`attention_received`.
        position_ids: [B, L] integer positions, passed to the model; packed rows restart
            at 0 for every document, and attention (output and scores) is then block-diagonal
            over the documents, with the per-query average over each key's own document.
            None = the model's default positions, one document per row.

    Returns:
        fp32 [B, L] on the model's device; 0 at padding positions.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor [B, L], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids: expected a non-empty [B, L] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask: expected a torch.Tensor [B, L] or None, got {type(attention_mask).__name__}"
            )
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask: expected input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    extra = {}
    if position_ids is not None:
        validate_documents(position_ids, None, input_ids.shape[0], input_ids.shape[1], position_ids.device)
        extra["position_ids"] = position_ids
    collector = ReceivedAttentionCollector(
        attention_mask, layers=layers, reduce=reduce, backend=backend, position_ids=position_ids
    )
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), collector.attach(model):
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        model.train(was_training)
    return collector.result()
