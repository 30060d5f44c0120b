"""Reading fine-tuning data and turning it into (input_ids, prompt length) pairs.

Accepted records: ``{"prompt": str, "response": str}`` (optional ``"id"``) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the assistant's
response; with messages the tokenizer's chat template renders the text and the boundary is the
rendered prompt (all messages but the last, plus the generation prompt). A prompt/response
record is joined as it is, as TRL does for non-conversational data: the prompt's tokens (with
the tokenizer's special tokens, e.g. BOS), then the response's, then EOS; no separator, no
chat template. ``chat_template=True`` renders it instead as a user turn and an assistant turn. Sources: a JSONL file
(errors carry line numbers), a JSON/Parquet/CSV file or a ``datasets.save_to_disk`` directory
loaded with ``datasets``, or an in-memory list of dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["XTFDataError", "Example", "TokenizeStats", "iter_records", "tokenize_records"]


class XTFDataError(ValueError):
    """Bad input data (the message names the file and line, or the record).

    ``reason`` is the skip category the record falls in: ``"bad_record"`` (malformed: not
    UTF-8, not JSON, missing or ill-typed fields) or ``"too_long"`` (longer than the context).
    """

    def __init__(self, message: str, reason: str = "bad_record") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Example:
    """One tokenised example: ``input_ids`` (list of int), the first ``n_prompt`` are the prompt."""

    example_id: int
    input_ids: list[int]
    n_prompt: int


@dataclass
class TokenizeStats:
    """Counts from loading: records read, skipped (by reason), truncated."""

    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    errors: list[str] = field(default_factory=list)

    def skip(self, reason: str, msg: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.errors) < 100:
            self.errors.append(msg)


def _jsonl_records(p: Path) -> Iterator[tuple[str, Any]]:
    """``(f"{p}, line N", record or XTFDataError)`` per non-blank line of a JSONL file.

    Lines are decoded one by one (UTF-8; a byte-order mark on the first line is dropped), so
    a line that is not UTF-8 or not JSON is one bad record, not the end of the file.
    """
    with open(p, "rb") as f:
        for i, raw in enumerate(f, start=1):
            where = f"{p}, line {i}"
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, XTFDataError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                    "save the file as UTF-8"
                )
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, XTFDataError(f"{where}: invalid JSON ({e})")


def iter_records(data: str | os.PathLike | Iterable[dict]) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)``; ``where`` is ``"FILE, line N"`` (JSONL) or ``"record N"``.

    A JSONL line that is not UTF-8 or not JSON yields ``(where, XTFDataError)`` so the caller
    decides to fail or skip.
    """
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.exists():
            raise FileNotFoundError(f"data: {p} does not exist")
        if p.is_file() and p.suffix in (".jsonl", ".ndjson"):
            yield from _jsonl_records(p)
            return
        try:
            import datasets
        except ImportError as e:  # pragma: no cover
            raise ImportError("data: loading non-JSONL data needs the `datasets` package") from e
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise XTFDataError(f"data: {p} is a DatasetDict without a 'train' split")
                ds = ds["train"]
        else:
            kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
            if kind is None:
                raise XTFDataError(f"data: unsupported file type {p.suffix!r} (use .jsonl, .json, .parquet, .csv or a dataset dir)")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        for i, rec in enumerate(ds):
            yield f"record {i}", rec
        return
    if isinstance(data, dict) or not isinstance(data, Iterable):
        raise TypeError("data: expected a path or an iterable of dict records")
    for i, rec in enumerate(data):
        yield f"record {i}", rec


def _texts(where: str, rec: Any, tokenizer, chat_template: bool = False) -> tuple[str, str, bool]:
    """(prompt text, response text, rendered with the chat template) of one record; raises
    XTFDataError naming ``where``. ``chat_template``: render prompt/response records too."""
    if not isinstance(rec, dict):
        raise XTFDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec and rec["messages"] is not None:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise XTFDataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        if msgs[-1]["role"] != "assistant":
            raise XTFDataError(f"{where}: the last message must have role 'assistant' (the response), got {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise XTFDataError(f"{where}: 'messages' needs at least one message before the assistant's response")
        return (*_render_chat(where, msgs, tokenizer), True)
    missing = [k for k in ("prompt", "response") if k not in rec]
    if missing:
        raise XTFDataError(f"{where}: missing field(s) {missing}; expected 'prompt' and 'response', or 'messages'")
    for k in ("prompt", "response"):
        if not isinstance(rec[k], str):
            raise XTFDataError(f"{where}: field {k!r} must be a string, got {type(rec[k]).__name__}")
    if chat_template:
        msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        return (*_render_chat(where, msgs, tokenizer), True)
    return rec["prompt"], rec["response"], False


def _render_chat(where: str, msgs: list[dict], tokenizer) -> tuple[str, str]:
    """(prompt, response) texts of a conversation: the rendering of all messages but the last
    with the generation prompt, and the rest of the full rendering."""
    if not getattr(tokenizer, "chat_template", None):
        raise XTFDataError(
            f"{where}: records use 'messages' but the tokenizer has no chat template; "
            "set tokenizer.chat_template or use prompt/response fields"
        )
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise XTFDataError(f"{where}: the chat template's rendering of the conversation does not start with its prompt")
    return prompt, full[len(prompt) :]


def tokenize_records(
    data: str | os.PathLike | Iterable[dict],
    tokenizer,
    *,
    max_length: int,
    on_error: str = "fail",
    truncation: str = "right",
    add_eos: bool = True,
    chat_template: bool = False,
) -> tuple[list[Example], TokenizeStats]:
    """Read and tokenise every record.

    Args:
        data: see :func:`iter_records`.
        tokenizer: a Hugging Face tokenizer.
        max_length: longest sequence the model accepts.
        on_error: ``"fail"`` (raise :class:`XTFDataError` naming the line) or ``"skip"`` (count it).
        truncation: ``"right"`` (cut the response, counted) or ``"skip"`` / ``"fail"`` for
            sequences longer than ``max_length``.
        add_eos: append the EOS token to prompt/response responses (chat templates add their own).
        chat_template: render prompt/response records with the tokenizer's chat template, as a
            user turn and an assistant turn (default: the prompt's tokens, then the response's).

    Returns:
        (examples, stats); ``example_id`` is the record's 0-based index in the source.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error: expected 'fail' or 'skip', got {on_error!r}")
    if truncation not in ("right", "skip", "fail"):
        raise ValueError(f"truncation: expected 'right', 'skip' or 'fail', got {truncation!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    if not isinstance(chat_template, bool):
        raise TypeError(f"chat_template: expected a bool, got {type(chat_template).__name__}")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template: the tokenizer has no chat template (set tokenizer.chat_template, "
                         "or score prompt/response records as they are)")
    stats = TokenizeStats()
    out: list[Example] = []
    for idx, (where, rec) in enumerate(iter_records(data)):
        stats.records += 1
        try:
            if isinstance(rec, XTFDataError):
                raise rec
            prompt, response, chat = _texts(where, rec, tokenizer, chat_template)
            if not response.strip():
                raise XTFDataError(f"{where}: empty response")
            p_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
            r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            eos = getattr(tokenizer, "eos_token_id", None)
            if add_eos and not chat and eos is not None:
                r_ids = r_ids + [eos]
            if not r_ids:
                raise XTFDataError(f"{where}: the response has no tokens")
            ids = p_ids + r_ids
            if len(ids) > max_length:
                if truncation == "fail":
                    raise XTFDataError(f"{where}: {len(ids)} tokens exceed the model's context of {max_length}",
                                       reason="too_long")
                if truncation == "skip" or len(p_ids) >= max_length - 1:
                    stats.skip("too_long", f"{where}: {len(ids)} tokens exceed {max_length} (prompt alone {len(p_ids)})")
                    continue
                ids = ids[:max_length]
                stats.truncated += 1
        except XTFDataError as e:
            if on_error == "fail" or e.reason == "too_long":
                raise
            stats.skip("bad_record", str(e))
            continue
        out.append(Example(example_id=idx, input_ids=[int(t) for t in ids], n_prompt=len(p_ids)))
    return out, stats
