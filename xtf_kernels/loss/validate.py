"""Input validation for :func:`xtf_kernels.masked_ce`: every check runs once, before any kernel
(the backends rely on it and do not check again)."""

from __future__ import annotations

from typing import Any

import torch

from ..backends import BACKENDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def validate(
    *,
    hidden: Any,
    weight: Any,
    labels: Any,
    bias: Any,
    keep: Any,
    ignore_index: Any,
    reduction: Any,
    num_items: Any,
    label_smoothing: Any,
    z_loss: Any,
    softcap: Any,
    shift: Any,
    ref_logprobs: Any,
    task_vector: Any,
    select: Any,
    return_stats: Any,
    backend: Any,
    empty_vocab: bool = False,
) -> None:
    """Raise TypeError/ValueError naming the argument for anything masked_ce cannot take
    (``empty_vocab``: a weight of no rows is fine, an empty vocabulary-parallel shard)."""
    hidden, weight, labels = _check_head(hidden, weight, labels, empty_vocab=empty_vocab)
    devices = _check_aligned(hidden=hidden, weight=weight, labels=labels, bias=bias, keep=keep,
                             ref_logprobs=ref_logprobs, task_vector=task_vector)
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    _check_scalars(ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                   label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, shift=shift,
                   labels=labels, select=select, return_stats=return_stats, backend=backend)


def _check_head(hidden: Any, weight: Any, labels: Any, *,
                empty_vocab: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [..., D], weight [V, D], labels [...] integers: types, shapes, dtypes."""
    hidden = check_tensor("hidden", hidden)
    weight = check_tensor("weight", weight)
    labels = check_tensor("labels", labels)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden: expected a floating dtype {FLOAT_DTYPES}, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., D], got a 0-d tensor")
    if hidden.shape[-1] < 1:
        raise ValueError(f"hidden: expected a feature dimension D >= 1 (shape [..., D]), got shape {_shape(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [V, D] tensor, got shape {_shape(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected D = hidden.shape[-1] = {hidden.shape[-1]} columns, "
            f"got shape {_shape(weight)}"
        )
    if weight.shape[0] < 1 and not empty_vocab:
        raise ValueError(f"weight: expected at least one vocabulary row, got shape {_shape(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (hidden's), got {weight.dtype}")
    if labels.dtype in (torch.bool,) or labels.dtype.is_floating_point or labels.is_complex():
        raise TypeError(f"labels: expected an integer dtype (any width; converted to int64), got {labels.dtype}")
    if _shape(labels) != _shape(hidden)[:-1]:
        raise ValueError(
            f"labels: expected shape {_shape(hidden)[:-1]} (hidden's leading shape), "
            f"got {_shape(labels)}"
        )
    return hidden, weight, labels


def _check_aligned(*, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Any,
                   keep: Any, ref_logprobs: Any, task_vector: Any) -> dict[str, torch.device]:
    """The optional tensors against hidden / weight / labels; returns every tensor's device."""
    devices = {"hidden": hidden.device, "weight": weight.device, "labels": labels.device}
    if bias is not None:
        bias = check_tensor("bias", bias)
        if _shape(bias) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {_shape(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected dtype {hidden.dtype} (hidden's), got {bias.dtype}")
        devices["bias"] = bias.device
    if keep is not None:
        keep = check_tensor("keep", keep)
        if keep.dtype != torch.bool:
            raise TypeError(f"keep: expected a bool tensor, got {keep.dtype}")
        if _shape(keep) != _shape(labels):
            raise ValueError(f"keep: expected shape {_shape(labels)} (labels'), got {_shape(keep)}")
        devices["keep"] = keep.device
    if ref_logprobs is not None:
        ref_logprobs = check_tensor("ref_logprobs", ref_logprobs)
        if not ref_logprobs.dtype.is_floating_point:
            raise TypeError(f"ref_logprobs: expected a floating dtype, got {ref_logprobs.dtype}")
        if _shape(ref_logprobs) != _shape(labels):
            raise ValueError(
                f"ref_logprobs: expected shape {_shape(labels)} (labels'), got {_shape(ref_logprobs)}"
            )
        devices["ref_logprobs"] = ref_logprobs.device
    if task_vector is not None:
        task_vector = check_tensor("task_vector", task_vector)
        if not task_vector.dtype.is_floating_point:
            raise TypeError(f"task_vector: expected a floating dtype, got {task_vector.dtype}")
        if _shape(task_vector) != (hidden.shape[-1],):
            raise ValueError(
                f"task_vector: expected shape ({hidden.shape[-1]},) (hidden's D), "
                f"got {_shape(task_vector)}"
            )
        devices["task_vector"] = task_vector.device
    return devices


def _check_scalars(*, ignore_index: Any, reduction: Any, num_items: Any, label_smoothing: Any,
                   z_loss: Any, softcap: Any, shift: Any, labels: torch.Tensor, select: Any,
                   return_stats: Any, backend: Any) -> None:
    """The non-tensor arguments (and num_items, an int or a 0-d tensor)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if num_items is not None:
        check_num_items(num_items)
    check_loss_options(label_smoothing=label_smoothing, z_loss=z_loss, select=select, backend=backend)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, int | float):
            raise TypeError(f"softcap: expected a positive float or None, got {type(softcap).__name__}")
        if not softcap > 0:
            raise ValueError(f"softcap: expected a positive float or None, got {softcap}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift: expected a bool, got {type(shift).__name__}")
    if shift and labels.dim() < 1:
        raise ValueError("shift: needs labels with a sequence dimension, got a 0-d tensor")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")


def check_loss_options(*, label_smoothing: Any, z_loss: Any, select: Any, backend: Any) -> None:
    """The loss options that :func:`masked_ce` and ``apply_xtf`` both take (one check for both)."""
    for name, val in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(val, bool) or not isinstance(val, int | float):
            raise TypeError(f"{name}: expected a float, got {type(val).__name__}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss: expected a value >= 0, got {z_loss}")
    if select is not None and not callable(select):
        raise TypeError(f"select: expected a callable(TokenStats) -> bool mask, got {type(select).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def check_num_items(num_items: Any, *, name: str = "num_items") -> float | None:
    """A token count: an int, or a 0-d tensor holding a whole number >= 0 (a float tensor such
    as the compiled path passes is fine when it is whole; values on an accelerator are not
    read back, to avoid a host sync). The one check of a ``num_items`` (masked_ce's, the patched
    models' ``num_items_in_batch``: ``name`` is the argument's name in the errors).

    Returns the value as a float, or None when it lives on an accelerator (not read).
    """
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0:
            raise ValueError(f"{name}: expected an int or a 0-d tensor, got shape {_shape(num_items)}")
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"{name}: expected an integer or float tensor, got dtype {num_items.dtype}")
        if num_items.device.type != "cpu":
            return None
        value = num_items.item()
    elif isinstance(num_items, bool) or not isinstance(num_items, int | float):
        raise TypeError(f"{name}: expected an int or a 0-d tensor, got {type(num_items).__name__}")
    else:
        value = num_items
    if not float(value).is_integer() and not _is_rank_share(value):
        raise ValueError(f"{name}: expected a whole number of tokens, got {value} (under "
                         f"torch.distributed the count / world_size that global_num_items returns "
                         f"is accepted too)")
    if value < 0:
        raise ValueError(f"{name}: expected >= 0, got {value}")
    return float(value)


def _world_size() -> int:
    """The default process group's size (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_rank_share(value: float) -> bool:
    """Whether ``value`` is a whole count divided by the data-parallel world size: the divisor
    :func:`~xtf_kernels.integrations.distributed.global_num_items` hands every rank so that the
    averaged gradient is the global mean's."""
    world = _world_size()
    total = float(value) * world
    return world > 1 and abs(total - round(total)) <= 1e-6 * max(1.0, abs(total))


def check_labels_in_range(y: torch.Tensor, valid: torch.Tensor, V: int, ignore_index: int) -> None:
    """labels outside [0, V) that are not ignore_index: a ValueError on CPU, a device assert on GPU."""
    bad = valid & ((y < 0) | (y >= V))
    if y.device.type == "cpu":
        if bool(bad.any()):
            first = y[bad][0].item()
            raise ValueError(
                f"labels: expected values in [0, {V}) or ignore_index={ignore_index}, got {first}"
            )
    else:
        torch._assert_async(
            ~bad.any(),
            f"labels: expected values in [0, {V}) or ignore_index={ignore_index} "
            "(set XTF_CHECK_LABELS=0 to skip this device-side check)",
        )


def check_select_output(mask: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"select: expected it to return a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"select: expected it to return a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"select: expected it to return shape {shape} (labels'), got {tuple(mask.shape)}")
    return mask.to(device)
