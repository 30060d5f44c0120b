"""Device, dtype and model loading for :func:`~xtf_kernels.xtf.pipeline.score_dataset`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..runtime import check_device_available, hf_progress

__all__ = ["check_tokenizer", "load_model_and_tokenizer", "load_models", "resolve_device", "resolve_dtype"]

#: What ``save_pretrained`` writes for a tokenizer (one of them names the vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

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
    progress: bool = True, with_tokenizer: bool = True,
):
    """Load a local Hugging Face causal-LM checkpoint and its tokenizer (nothing is downloaded).

    ``progress=False`` hides the checkpoint-loading bar; ``with_tokenizer=False`` loads the
    model only (the tokenizer is then ``None``).

    Raises:
        FileNotFoundError: no such directory / no config.json / no tokenizer files.
        ValueError: an unusable tokenizer (also one with under half the model's embedding rows),
            or no LM head in the checkpoint.
    """
    import transformers

    p = Path(model_dir)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"model: {p} is not a Hugging Face checkpoint directory (no config.json)")
    if with_tokenizer and not any(_is_tokenizer_file(f.name) for f in p.iterdir()):
        # transformers would build an empty tokenizer for some models (every text -> no tokens)
        raise FileNotFoundError(
            f"model: {p} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
            f"tokenizer with the model (tokenizer.save_pretrained({str(p)!r})), or pass tokenizer= in Python"
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True) if with_tokenizer else None
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
    if tok is not None:
        check_tokenizer(tok, model, f"the tokenizer in {p}")
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok


def _is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.startswith(("tokenizer", "vocab")) or name.endswith(
        (".tiktoken", "spiece.model", "sentencepiece.bpe.model")
    )


def check_tokenizer(tokenizer: Any, model: Any, source: str) -> None:
    """Refuse a tokenizer whose vocabulary is under half the model's embedding rows.

    Such a tokenizer is not the model's (an empty one built from a directory without tokenizer
    files, or another model's): scoring with it gives wrong token ids silently.

    Args:
        tokenizer: a Hugging Face tokenizer (``len()`` is its vocabulary with added tokens).
        model: the causal LM (``get_input_embeddings().weight`` is ``[V, D]``).
        source: where the tokenizer came from, for the message.

    Raises:
        ValueError: naming both sizes and ``source``.
    """
    try:
        n_tok = len(tokenizer)
    except TypeError:  # not a sized tokenizer: nothing to compare
        return
    n_emb = int(model.get_input_embeddings().weight.shape[0])
    if 2 * n_tok < n_emb:
        raise ValueError(
            f"tokenizer: {source} has {n_tok} tokens, under half the model's {n_emb} embedding rows; "
            "it is not this model's tokenizer (save the model's tokenizer with it)"
        )


def load_models(
    model: Any, ref_model: Any, tokenizer: Any, *, dtype: torch.dtype, device: torch.device, progress: bool
) -> tuple[Any, Any, str, Any, str | None]:
    """(model, tokenizer, model id, reference model or None, its id) from paths or modules."""
    given = tokenizer is not None
    if isinstance(model, (str, os.PathLike)):
        model_id = str(Path(model).resolve())
        model, tok = load_model_and_tokenizer(
            model, dtype=dtype, device=device, progress=progress, with_tokenizer=not given
        )
        tokenizer = tokenizer or tok
    elif isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("tokenizer: required when model is a loaded module")
        model_id = f"{type(model).__name__}:{getattr(model.config, '_name_or_path', '')}"
        model = model.to(device).eval()
    else:
        raise TypeError(f"model: expected a checkpoint directory or a torch.nn.Module, got {type(model).__name__}")
    if given:  # the directory's own tokenizer was checked on loading
        check_tokenizer(tokenizer, model, "tokenizer=")
    if isinstance(ref_model, (str, os.PathLike)):
        ref_id = str(Path(ref_model).resolve())
        ref_model, _ = load_model_and_tokenizer(
            ref_model, dtype=dtype, device=device, progress=progress, with_tokenizer=False
        )
    elif ref_model is None or isinstance(ref_model, torch.nn.Module):
        ref_id = None if ref_model is None else type(ref_model).__name__
        if ref_model is not None:
            ref_model = ref_model.to(device).eval()
    else:
        raise TypeError(f"ref_model: expected None, a directory or a torch.nn.Module, got {type(ref_model).__name__}")
    return model, tokenizer, model_id, ref_model, ref_id
