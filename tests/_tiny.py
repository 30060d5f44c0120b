"""Tiny random-init Hugging Face models and locally trained tokenizers for tests (no downloads).

Reusable by every test module::

    from tests._tiny import make_tokenizer, make_tiny_model_dir, SAMPLE_TEXTS

    tok = make_tokenizer()                              # byte-level BPE + chat template
    model_dir = make_tiny_model_dir(tmp_path, arch="llama")  # config + weights + tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)

Everything is seeded, so two calls with the same arguments give identical weights and vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

#: Default corpus the tokenizer is trained on: short math / code / chat snippets.
SAMPLE_TEXTS: tuple[str, ...] = (
    "What is 12 plus 30? The answer is 42.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "How many clips did Natalia sell altogether in April and May? She sold 48 + 24 = 72 clips.",
    "def add(a, b):\n    return a + b\n",
    "Write a function that reverses a string. def rev(s): return s[::-1]",
    "The patient was given 5 mg of the drug twice a day for two weeks.",
    "Does aspirin reduce the risk of heart attack? Yes, in some patients.",
    "Let x = 3. Then 2x + 1 = 7, so the result is 7.",
    "Explain why the sky is blue. Sunlight scatters off air molecules; blue scatters most.",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
)

#: Special tokens of the tiny tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>")

#: A minimal chat template: ``<s><|user|>...</s><|assistant|>...</s>``; the generation prompt
#: is ``<|assistant|>`` so prompt/response boundaries are found by prefix length.
CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}</s>"
    "{% elif m['role'] == 'system' %}<|system|>{{ m['content'] }}</s>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_ARCHS = ("llama", "qwen2", "mistral", "gemma2")


def make_tokenizer(
    texts: Sequence[str] | None = None,
    *,
    vocab_size: int = 384,
    chat_template: str | None = CHAT_TEMPLATE,
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it in ``PreTrainedTokenizerFast``.

    Args:
        texts: training corpus (default :data:`SAMPLE_TEXTS`); byte-level, so any text encodes.
        vocab_size: target vocabulary size including the 256 byte symbols and special tokens.
        chat_template: Jinja chat template to attach (None: no template, to test that error).

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk set, right padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = SAMPLE_TEXTS
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: expected a sequence of str")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: expected an int >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def make_tiny_config(arch: str = "llama", vocab_size: int = 384, **overrides):
    """A tiny ``transformers`` config: 2 layers, hidden 32, 4 query heads, 2 KV heads (GQA).

    Args:
        arch: one of "llama", "qwen2", "mistral" (sliding window 8), "gemma2" (sliding window
            8, softcapping).
        vocab_size: vocabulary size (match the tokenizer's ``len(tok)``).
        overrides: any other config field.
    """
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"arch: expected one of {_ARCHS}, got {arch!r}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**{**common, **overrides})
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, **overrides})
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": 8, **overrides})
    else:
        cfg = transformers.Gemma2Config(
            **{**common, "head_dim": 8, "sliding_window": 8, "tie_word_embeddings": True, **overrides}
        )
    return cfg


def make_tiny_model(arch: str = "llama", vocab_size: int = 384, seed: int = 0, **overrides):
    """A tiny random-init causal LM (eval mode, fp32) built from :func:`make_tiny_config`."""
    import transformers

    cfg = make_tiny_config(arch, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def make_tiny_model_dir(
    tmp_path: Path | str,
    arch: str = "llama",
    *,
    texts: Sequence[str] | None = None,
    seed: int = 0,
    name: str | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    save_tokenizer: bool = True,
    **overrides,
) -> Path:
    """Save a tiny random-init model and its tokenizer to ``tmp_path / name`` and return the path.

    Args:
        tmp_path: parent directory (pytest's ``tmp_path``).
        arch: see :func:`make_tiny_config`.
        texts: tokenizer training corpus (default :data:`SAMPLE_TEXTS`).
        seed: weight-init seed.
        name: sub-directory name (default ``f"tiny-{arch}"``).
        chat_template: chat template of the saved tokenizer (None: none).
        save_tokenizer: False writes only the model (to test a missing-tokenizer error).
        overrides: config fields.

    Returns:
        Path of a directory loadable by ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    tok = make_tokenizer(texts, chat_template=chat_template)
    model = make_tiny_model(arch, vocab_size=len(tok), seed=seed, **overrides)
    out = Path(tmp_path) / (name or f"tiny-{arch}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if save_tokenizer:
        tok.save_pretrained(out)
    return out


def eager_attentions(model, input_ids, attention_mask):
    """The model's outputs with ``output_attentions=True`` under eager attention (no grad); the
    model's attention implementation is restored afterwards."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(prev)


def eager_received_attention(model, input_ids, attention_mask, *, layers=None, reduce="mean_over_queries"):
    """Oracle / fallback for ``collect_received_attention`` from eager ``output_attentions=True``.

    fp32 ``[B, L]``: attention received by each key position, averaged over the valid query
    positions that attend to it (causal: the later, non-padding queries; ``reduce="sum"``: the
    raw summed mass), then over heads and the chosen layers; 0 at padding. Materialises the
    [B, H, L, L] probabilities, so it is for tiny test models only.
    """
    atts = eager_attentions(model, input_ids, attention_mask).attentions
    idx = range(len(atts)) if layers is None else layers
    m = attention_mask.to(torch.float32)
    total = None
    for i in idx:
        a = atts[i].float() * m[:, None, :, None]  # zero padded queries
        recv = a.sum(dim=2)  # [B, H, L] summed over queries
        if reduce == "mean_over_queries":
            seen = (a > 0).sum(dim=2).clamp_min(1).float()
            recv = recv / seen
        r = recv.mean(dim=1)
        total = r if total is None else total + r
    return (total / len(list(idx))) * m
