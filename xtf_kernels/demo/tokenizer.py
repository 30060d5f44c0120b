"""A byte-level BPE tokenizer trained locally on the demo text, and token-level noise labels.

Digits are split one per token (arithmetic is then learnable by a tiny model). The prompt is
encoded with a leading ``<s>``; the response without special tokens, followed by ``</s>``:
exactly how :func:`xtf_kernels.xtf.data.tokenize_records` encodes prompt/response records, so
token positions agree with ``xtf score`` output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data import NOISE_KINDS, MathExample

__all__ = ["SPECIAL_TOKENS", "train_tokenizer", "encode_example", "noise_token_labels"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """Train the demo tokenizer on ``texts``.

    Args:
        texts: training corpus (list of str).
        vocab_size: target vocabulary size (>= 300: 256 byte symbols + specials + merges).

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk = ids 0/1/2/3, right padding,
        which prepends ``<s>`` when ``add_special_tokens=True``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
        raise TypeError("texts: expected a non-empty sequence of str")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size: expected an int >= 300, got {vocab_size!r}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="right",
    )


def encode_example(tokenizer, ex: MathExample) -> tuple[list[int], int, list[tuple[int, int]]]:
    """Token ids of one example: ``<s> prompt`` + ``response`` + ``</s>``.

    Returns:
        ``(input_ids, n_prompt, response_offsets)``; ``response_offsets[i]`` is the character
        range in ``ex.response`` of response token ``i`` (``(len, len)`` for the final ``</s>``).
    """
    if not isinstance(ex, MathExample):
        raise TypeError(f"ex: expected a MathExample, got {type(ex).__name__}")
    p = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(ex.response, add_special_tokens=False, return_offsets_mapping=True)
    n = len(ex.response)
    offsets = [tuple(o) for o in r["offset_mapping"]] + [(n, n)]
    return list(p) + list(r["input_ids"]) + [tokenizer.eos_token_id], len(p), offsets


def noise_token_labels(tokenizer, ex: MathExample) -> tuple[np.ndarray, int]:
    """Per-token noise kind of an encoded example.

    A token gets kind ``k + 1`` (``k`` its index in :data:`NOISE_KINDS`) when its character range
    lies inside a recorded span of that kind, 0 otherwise (prompt tokens and ``</s>`` are 0).
    ByteLevel offsets exclude a token's leading space, so a span that begins with a space still
    covers the token.

    Returns:
        ``(labels int8 [len(input_ids)], partial)`` where ``partial`` counts tokens that straddle
        a span boundary (0 when spans fall on token boundaries, which the generator guarantees
        for this tokenizer; the tests check it).
    """
    ids, n_prompt, offsets = encode_example(tokenizer, ex)
    lab = np.zeros(len(ids), dtype=np.int8)
    partial = 0
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        for span in ex.noise:
            if span.kind not in NOISE_KINDS:
                raise ValueError(f"ex: unknown noise kind {span.kind!r}")
            inter = min(e, span.end) - max(s, span.start)
            if inter <= 0:
                continue
            if s >= span.start and e <= span.end:
                lab[n_prompt + i] = NOISE_KINDS.index(span.kind) + 1
            else:
                partial += 1
    return lab, partial
