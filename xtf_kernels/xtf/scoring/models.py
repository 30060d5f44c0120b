"""Device, dtype and model loading for :func:`~xtf_kernels.xtf.pipeline.score_dataset`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..runtime import check_device_available, hf_progress

__all__ = ["load_model_and_tokenizer", "load_models", "resolve_device", "resolve_dtype"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU; other names checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    check_device_available(dev)
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on a GPU with bf16, else fp32; ``"bf16"``, ``"fp16"``, ``"fp32"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected 'auto', 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    return _DTYPES[dtype]


def load_model_and_tokenizer(
    model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    progress: bool = True,
):
    """Load a local Hugging Face causal-LM checkpoint and its tokenizer (nothing is downloaded).

    ``progress=False`` hides the checkpoint-loading bar.

    Raises:
        FileNotFoundError: no such directory / no config.json.
        ValueError: no tokenizer in the directory, or no LM head in the checkpoint.
    """
    import transformers

    p = Path(model_dir)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"model: {p} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ValueError(f"model: no usable tokenizer in {p} ({type(e).__name__}: {e})") from e
    try:
        with hf_progress(progress):
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(p), dtype=dtype, local_files_only=True, output_loading_info=True
            )
    except ValueError as e:
        raise ValueError(f"model: {p} cannot be loaded as a causal LM ({e})") from e
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    missing = [k for k in info.get("missing_keys", []) if "lm_head" in k or "output" in k.split(".")[0]]
    if head is None or (missing and not tied):
        raise ValueError(
            f"model: the checkpoint in {p} has no LM head weights ({missing or 'no output embeddings'}); "
            "XTF needs the *ForCausalLM checkpoint that will be fine-tuned"
        )
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok


def load_models(
    model: Any, ref_model: Any, tokenizer: Any, *, dtype: torch.dtype, device: torch.device, progress: bool
) -> tuple[Any, Any, str, Any, str | None]:
    """(model, tokenizer, model id, reference model or None, its id) from paths or modules."""
    if isinstance(model, (str, os.PathLike)):
        model_id = str(Path(model).resolve())
        model, tok = load_model_and_tokenizer(model, dtype=dtype, device=device, progress=progress)
        tokenizer = tokenizer or tok
    elif isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("tokenizer: required when model is a loaded module")
        model_id = f"{type(model).__name__}:{getattr(model.config, '_name_or_path', '')}"
        model = model.to(device).eval()
    else:
        raise TypeError(f"model: expected a checkpoint directory or a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ref_model, (str, os.PathLike)):
        ref_id = str(Path(ref_model).resolve())
        ref_model, _ = load_model_and_tokenizer(ref_model, dtype=dtype, device=device, progress=progress)
    elif ref_model is None or isinstance(ref_model, torch.nn.Module):
        ref_id = None if ref_model is None else type(ref_model).__name__
        if ref_model is not None:
            ref_model = ref_model.to(device).eval()
    else:
        raise TypeError(f"ref_model: expected None, a directory or a torch.nn.Module, got {type(ref_model).__name__}")
    return model, tokenizer, model_id, ref_model, ref_id
