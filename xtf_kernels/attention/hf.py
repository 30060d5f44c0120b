"""Hugging Face plug-in: attention received, collected during a normal forward pass.

One function is registered in transformers' attention registry under the name
:data:`ATTN_IMPLEMENTATION` (``AttentionInterface.register``), with SDPA's mask builder
(``AttentionMaskInterface.register``). Every model whose attention layers dispatch through
``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral, Gemma 2, ... ) then calls it with its own
query/key/value states (after RoPE), ``scaling``, ``sliding_window`` and ``softcap``. The
function

* computes the layer's normal output with ``sdpa_attention_forward`` (with logit
  soft-capping, which SDPA cannot do, with the chunked torch attention of this package:
  same O(L) memory, same result as eager attention up to rounding);
* adds that layer's received-attention scores (:func:`attention_received`, averaged over
  heads) to the active :class:`ReceivedAttentionCollector`.

No per-model code: scaling, windows, soft-capping and GQA come from the call's arguments and
the attention module's attributes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._common import REDUCES, valid_mask
from .received import attention_received

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


def register() -> str:
    """Register the collecting attention function (idempotent); returns its name."""
    global _registered
    with _reg_lock:
        if not _registered:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(ATTN_IMPLEMENTATION, _xtf_attention_forward)
            AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    softcap = kwargs.get("softcap")
    stack = _stack()
    collector = stack[-1] if stack else None
    if softcap is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    else:
        out = _softcapped_output(module, query, key, value, kwargs, collector)
    if collector is not None:
        collector._add(module, query, key, kwargs)
    return out, None


def _softcapped_output(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kwargs: dict[str, Any],
    collector: ReceivedAttentionCollector | None,
) -> torch.Tensor:
    """Attention output with logit soft-capping (tiled, O(L) memory); [B, Lq, Hq, Dv]."""
    from .torch_impl import default_block, row_lse

    if kwargs.get("dropout", 0.0):
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION}: attention dropout is not supported; call model.eval() first"
        )
    B, Hq, Lq, Dh = query.shape
    if key.shape[2] != Lq:
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION}: expected as many keys as queries (no KV cache), got "
            f"{key.shape[2]} keys for {Lq} queries; call the model with use_cache=False"
        )
    mask = collector.attention_mask if collector is not None else None
    if mask is not None and mask.device != query.device:
        mask = mask.to(query.device)
    valid = valid_mask(mask, B, Lq, query.device)
    scaling = kwargs.get("scaling")
    window = _module_setting(module, kwargs, "sliding_window", "sliding_window", None)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = bool(getattr(module, "is_causal", True))
    _, out = row_lse(
        query,
        key,
        valid,
        scale=float(scaling) if scaling is not None else Dh**-0.5,
        causal=causal,
        window=window,
        softcap=float(kwargs["softcap"]),
        block=default_block(B, Hq, Lq),
        v=value,
    )
    return out.transpose(1, 2).contiguous()


class ReceivedAttentionCollector:
    """Accumulates per-layer received attention during a Hugging Face forward pass.

    Usage::

        col = ReceivedAttentionCollector(attention_mask)        # [B, L], 1 = real token
        with torch.no_grad(), col.attach(model):
            model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        scores = col.result()                                   # fp32 [B, L]

    ``attach`` switches the model to the registered attention implementation and restores
    the previous one on exit (also on error). Each selected layer contributes the mean over
    its query heads of :func:`attention_received`; :meth:`result` averages over the layers
    that contributed.

    Args:
        attention_mask: [B, L] bool/0-1 integer (1 = real token), or None (no padding). It
            must be the mask the model is called with.
        layers: layer indices to aggregate (negative counts from the end, resolved against
            the model's ``num_hidden_layers`` on attach); None = all layers.
        reduce: ``"mean_over_queries"`` (default) or ``"sum"``, see :func:`attention_received`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the scorer.
    """

    def __init__(
        self,
        attention_mask: torch.Tensor | None,
        *,
        layers: Sequence[int] | None = None,
        reduce: str = "mean_over_queries",
        backend: str = "auto",
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
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend: expected one of ('auto', 'torch', 'triton'), got {backend!r}")
        self.attention_mask = attention_mask
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

    def _add(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> None:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = self._calls
        self._calls += 1
        if self._layers is not None and idx not in self._layers:
            return
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
        scaling = kwargs.get("scaling")
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = bool(getattr(module, "is_causal", True))
        softcap = kwargs.get("softcap")
        r = attention_received(
            query,
            key,
            scale=float(scaling) if scaling is not None else None,
            attention_mask=mask,
            causal=causal,
            sliding_window=_module_setting(module, kwargs, "sliding_window", "sliding_window", None),
            softcap=float(softcap) if softcap is not None else None,
            reduce=self.reduce,
            backend=self.backend,
        )
        layer_score = r.mean(dim=1)
        self._sum = layer_score if self._sum is None else self._sum + layer_score.to(self._sum.device)
        self._seen.append(idx)

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
    collector = ReceivedAttentionCollector(attention_mask, layers=layers, reduce=reduce, backend=backend)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), collector.attach(model):
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        model.train(was_training)
    return collector.result()
