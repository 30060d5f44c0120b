"""Batches from ``xtf export`` / ``xtf score`` records: padded ids, labels and the keep mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._patch_state import KEEP_FIELDS, REF_FIELDS, RESPONSE_FIELDS
from .packed import flatten_records

#: batch field of the response mask (what trainers count ``xtf/kept_fraction`` against)
RESPONSE_KEY = RESPONSE_FIELDS[1]


def _as_list(value: Any, name: str, index: int) -> list:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"records[{index}].{name}: expected a 1-D sequence, got shape {tuple(value.shape)}")
        return value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, list | tuple):  # numpy / pyarrow
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise TypeError(f"records[{index}].{name}: expected a list of numbers, got {type(value).__name__}")
    return list(value)


class XTFCollator:
    """Turn records ``{"input_ids", "labels"?, "keep"?, "ref_logprobs"?, "response"?}`` into padded batches.

    Records are what ``xtf export`` writes (``input_ids``, ``labels`` with -100 on prompt
    and masked tokens, ``keep``, ``response``) or the same with a per-token ``keep`` list
    instead of / in addition to masked labels (so a batch carries the XTF mask without
    rewriting labels). Lists, 1-D tensors and NumPy arrays are accepted.

    The batch (a dict of tensors) holds:

    * ``input_ids`` ``[B, L]`` int64, padded with ``pad_token_id``;
    * ``attention_mask`` ``[B, L]`` int64 (1 = real token);
    * ``labels`` ``[B, L]`` int64: the record's labels (default: a copy of ``input_ids``),
      -100 on padding; with ``apply_keep_to_labels=True`` also -100 where keep is False;
    * ``keep_key`` (default ``"xtf_keep"``) ``[B, L]`` bool, False on masked tokens and
      padding; omitted with ``apply_keep_to_labels=True`` or when no record has a keep list;
    * ``ref_key`` ``[B, L]`` fp32 reference log-probs (NaN on padding), when records have them;
    * ``xtf_response`` ``[B, L]`` bool, the records' ``response`` lists (True on response
      tokens, masked or not; False on padding), when records have them and
      ``apply_keep_to_labels=False``. The loss does not use it: ``XTFSFTTrainer`` counts
      ``xtf/kept_fraction`` against it, since ``xtf export``'s labels hide the masked tokens.

    Args:
        pad_token_id: id used to pad ``input_ids``.
        keep_key: batch field of the keep mask (match ``apply_xtf(keep_key=...)``).
        ref_key: batch field of the reference log-probs.
        padding_side: ``"right"`` or ``"left"``.
        max_length: truncate longer records (keeping their start) when set.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        apply_keep_to_labels: write -100 into labels where keep is False and drop the mask
            (for trainers or models that cannot take a keep mask).
        packing: padding-free batches, as transformers' ``DataCollatorWithFlattening``: the
            records are concatenated into ONE row ``[1, T]`` with ``position_ids`` restarting
            at 0 per record and no ``attention_mask`` (transformers then builds block-diagonal
            masks for SDPA / eager attention; flash-attention reads the documents from
            ``position_ids``); the first label of every record is -100 and the keep mask /
            reference log-probs stay aligned token by token. ``padding_side`` does not apply;
            ``pad_to_multiple_of`` appends one-token padding documents (label -100, keep False).
        return_flash_attn_kwargs: with ``packing``, also return ``cu_seq_lens_q/k`` (int32
            document offsets) and ``max_length_q/k`` (ints), as transformers does.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        keep_key: str = "xtf_keep",
        ref_key: str = "xtf_ref_logprobs",
        padding_side: str = "right",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        apply_keep_to_labels: bool = False,
        packing: bool = False,
        return_flash_attn_kwargs: bool = False,
    ) -> None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected a non-negative int, got {pad_token_id!r}")
        for name, val in (("keep_key", keep_key), ("ref_key", ref_key)):
            if not isinstance(val, str) or not val:
                raise ValueError(f"{name}: expected a non-empty string, got {val!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
        for name, val in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {val!r}")
        for name, val in (("apply_keep_to_labels", apply_keep_to_labels), ("packing", packing),
                          ("return_flash_attn_kwargs", return_flash_attn_kwargs)):
            if not isinstance(val, bool):
                raise TypeError(f"{name}: expected a bool, got {type(val).__name__}")
        if return_flash_attn_kwargs and not packing:
            raise ValueError("return_flash_attn_kwargs: only with packing=True")
        self.pad_token_id = pad_token_id
        self.keep_key = keep_key
        self.ref_key = ref_key
        self.padding_side = padding_side
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.apply_keep_to_labels = apply_keep_to_labels
        self.packing = packing
        self.return_flash_attn_kwargs = return_flash_attn_kwargs

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``records`` (see the class docstring) into a dict of ``[B, L]`` tensors."""
        if isinstance(records, Mapping) or not isinstance(records, Sequence) or len(records) == 0:
            raise ValueError("records: expected a non-empty list of dict records")
        rows = [self._parse(r, i) for i, r in enumerate(records)]
        has_keep = any(row[2] is not None for row in rows)
        has_ref = any(row[3] is not None for row in rows)
        if has_ref and not all(row[3] is not None for row in rows):
            raise ValueError("records: ref_logprobs present in some records only; give all or none")
        has_resp = any(row[4] is not None for row in rows)
        if has_resp and not all(row[4] is not None for row in rows):
            raise ValueError("records: response present in some records only; give all or none")
        if self.packing:
            return self._packed(rows, has_keep)
        L = max(len(row[0]) for row in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m
        B = len(rows)
        ids_t = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        lab_t = torch.full((B, L), -100, dtype=torch.long)
        att_t = torch.zeros((B, L), dtype=torch.long)
        keep_t = torch.zeros((B, L), dtype=torch.bool)
        ref_t = torch.full((B, L), float("nan"), dtype=torch.float32) if has_ref else None
        resp_t = torch.zeros((B, L), dtype=torch.bool) if has_resp and not self.apply_keep_to_labels else None
        for b, (ids, lab, keep, ref, resp) in enumerate(rows):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(L - n, L)
            ids_t[b, sl] = torch.tensor(ids, dtype=torch.long)
            lab_t[b, sl] = torch.tensor(lab, dtype=torch.long)
            att_t[b, sl] = 1
            keep_t[b, sl] = True if keep is None else torch.tensor(keep, dtype=torch.bool)
            if ref_t is not None and ref is not None:
                ref_t[b, sl] = torch.tensor(ref, dtype=torch.float32)
            if resp_t is not None:
                resp_t[b, sl] = torch.tensor(resp, dtype=torch.bool)
        out = {"input_ids": ids_t, "attention_mask": att_t}
        if self.apply_keep_to_labels:
            out["labels"] = lab_t.masked_fill(~keep_t, -100)
        else:
            out["labels"] = lab_t
            if has_keep:
                out[self.keep_key] = keep_t
        if ref_t is not None:
            out[self.ref_key] = ref_t
        if resp_t is not None:
            out[RESPONSE_KEY] = resp_t
        return out

    def _packed(self, rows: list, has_keep: bool) -> dict[str, Any]:
        flat = flatten_records(rows, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of,
                               flash_attn_kwargs=self.return_flash_attn_kwargs)
        keep, ref, resp = flat.pop("keep"), flat.pop("ref"), flat.pop("response")
        if self.apply_keep_to_labels:
            flat["labels"] = flat["labels"].masked_fill(~keep, -100)
        else:
            if has_keep:
                flat[self.keep_key] = keep
            if resp is not None:
                flat[RESPONSE_KEY] = resp
        if ref is not None:
            flat[self.ref_key] = ref
        return flat

    def _parse(self, rec: Mapping[str, Any], i: int) -> tuple[list, list, list | None, list | None, list | None]:
        if not isinstance(rec, Mapping):
            raise TypeError(f"records[{i}]: expected a dict, got {type(rec).__name__}")
        if "input_ids" not in rec:
            raise ValueError(f"records[{i}]: missing field 'input_ids' (keys: {sorted(rec)})")
        ids = _as_list(rec["input_ids"], "input_ids", i)
        if not ids:
            raise ValueError(f"records[{i}].input_ids: expected at least one token, got none")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"records[{i}].input_ids: expected non-negative ints")
        lab = _as_list(rec["labels"], "labels", i) if rec.get("labels") is not None else list(ids)
        if len(lab) != len(ids):
            raise ValueError(f"records[{i}].labels: expected length {len(ids)} (input_ids'), got {len(lab)}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in lab):
            raise ValueError(f"records[{i}].labels: expected ints (-100 = not trained)")
        keep = None
        for f in (*KEEP_FIELDS, self.keep_key):
            if rec.get(f) is not None:
                keep = [bool(v) for v in _as_list(rec[f], f, i)]
                if len(keep) != len(ids):
                    raise ValueError(f"records[{i}].{f}: expected length {len(ids)} (input_ids'), got {len(keep)}")
                break
        ref = None
        for f in (*REF_FIELDS, self.ref_key):
            if rec.get(f) is not None:
                ref = [float("nan") if v is None else float(v) for v in _as_list(rec[f], f, i)]
                if len(ref) != len(ids):
                    raise ValueError(f"records[{i}].{f}: expected length {len(ids)} (input_ids'), got {len(ref)}")
                break
        resp = None
        for f in RESPONSE_FIELDS:
            if rec.get(f) is not None:
                resp = [bool(v) for v in _as_list(rec[f], f, i)]
                if len(resp) != len(ids):
                    raise ValueError(f"records[{i}].{f}: expected length {len(ids)} (input_ids'), got {len(resp)}")
                break
        if self.max_length is not None and len(ids) > self.max_length:
            n = self.max_length
            ids, lab = ids[:n], lab[:n]
            keep = keep[:n] if keep is not None else None
            ref = ref[:n] if ref is not None else None
            resp = resp[:n] if resp is not None else None
        return ids, lab, keep, ref, resp


__all__ = ["XTFCollator"]
