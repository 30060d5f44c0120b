"""Tiny Llama model, training loops on ``masked_ce`` and greedy exact-match evaluation."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..lm_head import lm_head_spec
from ..loss import masked_ce
from .data import MathExample, noise_shares
from .tokenizer import encode_example

__all__ = ["ModelSize", "make_model", "Batchable", "train", "clone_model", "with_lora", "greedy_answers", "exact_match",
           "extract_answer", "teacher_forced_logprobs", "count_params"]


@dataclass(frozen=True)
class ModelSize:
    """Llama-style model dimensions."""

    hidden: int = 96
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_len: int = 256


def make_model(vocab_size: int, size: ModelSize, seed: int):
    """Random-init ``LlamaForCausalLM`` (fp32, untied head, SDPA attention), seeded.

    Args:
        vocab_size: tokenizer size (pad/bos/eos ids 0/1/2).
        size: dimensions.
        seed: init seed.
    """
    import transformers

    if not isinstance(size, ModelSize):
        raise TypeError(f"size: expected a ModelSize, got {type(size).__name__}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"vocab_size: expected an int >= 4, got {vocab_size!r}")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_len, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


@dataclass
class Batchable:
    """Token sequences ready for training.

    Attributes:
        ids: token ids per sequence.
        n_prompt: prompt length per sequence (those labels are ignored).
        keep: optional per-token bool keep masks (label-aligned, same lengths as ``ids``).
        ref_logprobs: optional per-token reference-model log-probs (for ``select`` policies).
        noise: optional per-token ground-truth noise labels (0 clean, else the kind's index in
            ``NOISE_KINDS`` + 1); only used to record the noise shares of a dynamic selection
            (SLM) per step.
    """

    ids: list[list[int]]
    n_prompt: list[int]
    keep: list[np.ndarray] | None = None
    ref_logprobs: list[np.ndarray] | None = None
    noise: list[np.ndarray] | None = None

    @classmethod
    def from_examples(cls, tokenizer, examples: Sequence[MathExample]) -> Batchable:
        """Prompt + response examples: only response tokens (and ``</s>``) are trained on."""
        enc = [encode_example(tokenizer, e)[:2] for e in examples]
        return cls([e[0] for e in enc], [e[1] for e in enc])

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str]) -> Batchable:
        """Raw text for pretraining: every token after ``<s>`` is trained on."""
        ids = [tokenizer(t, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        return cls(ids, [1] * len(ids))

    def batch(self, idx: Sequence[int], max_len: int) -> dict[str, torch.Tensor | None]:
        """Right-padded tensors for rows ``idx``: input_ids, attention_mask, labels, keep, ref."""
        rows = [self.ids[i][:max_len] for i in idx]
        L = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), L), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        keep = torch.ones((len(rows), L), dtype=torch.bool) if self.keep is not None else None
        ref = torch.zeros((len(rows), L)) if self.ref_logprobs is not None else None
        noise = torch.zeros((len(rows), L), dtype=torch.int8) if self.noise is not None else None
        for b, (i, r) in enumerate(zip(idx, rows)):
            n = len(r)
            ids[b, :n] = torch.tensor(r)
            mask[b, :n] = 1
            labels[b, self.n_prompt[i] : n] = ids[b, self.n_prompt[i] : n]
            if keep is not None:
                keep[b, :n] = torch.from_numpy(np.asarray(self.keep[i][:n], dtype=bool))
            if ref is not None:
                ref[b, :n] = torch.from_numpy(np.nan_to_num(np.asarray(self.ref_logprobs[i][:n], np.float32)))
            if noise is not None:
                noise[b, :n] = torch.from_numpy(np.asarray(self.noise[i][:n], dtype=np.int8))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "keep": keep, "ref": ref, "noise": noise}


def train(model, data: Batchable, *, steps: int, batch_size: int, lr: float, seed: int,
          select: Callable | None = None, desc: str = "train", progress: bool = True,
          max_len: int | None = None, autocast_dtype: torch.dtype | None = None,
          record: dict | None = None) -> list[float]:
    """Train ``model`` in place with AdamW on the fused masked cross-entropy.

    Loss: ``masked_ce(hidden, head.weight, labels, keep=..., shift=True)``, the mean over kept
    response tokens (the paper's Eq. 8). The batch order depends only on ``seed`` and the data
    size, so runs with the same seed see the same batches whatever their masks.

    Args:
        model: ``LlamaForCausalLM``.
        data: sequences, prompt lengths and optional keep masks / reference log-probs.
        steps: optimizer steps (> 0).
        batch_size: sequences per step.
        lr: peak learning rate (linear warm-up over 5% of steps, cosine decay to 10%).
        seed: batch-order seed.
        select: optional ``select=`` callable for ``masked_ce`` (dynamic selection, e.g. SLM).
        desc: progress-bar label.
        progress: show a tqdm bar.
        max_len: truncate sequences (default: the model's ``max_position_embeddings``).
        autocast_dtype: e.g. ``torch.bfloat16`` on a GPU (None: the parameters' dtype).
        record: optional dict; with ``select`` and ``data.noise`` it receives
            ``kept_noise`` (per step: :func:`~xtf_kernels.demo.data.noise_shares` of the tokens
            ``select`` kept).

    Any ``*ForCausalLM`` (also wrapped by ``peft``) works: the decoder is ``get_decoder()``, the
    head :func:`~xtf_kernels.lm_head.lm_head_spec` (bias, logit scale and softcap honoured); only
    parameters with ``requires_grad`` are optimised.

    Returns:
        the training loss per step (float).
    """
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not isinstance(data, Batchable) or not data.ids:
        raise ValueError("data: expected a non-empty Batchable")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    max_len = int(max_len or model.config.max_position_embeddings)
    dev = params[0].device
    decoder = model.get_decoder()
    head = lm_head_spec(model)  # the one description of the head: weight, bias, scale, softcap
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        if len(order) < batch_size:
            order.extend(rng.permutation(len(data.ids)).tolist())
        idx, order = order[:batch_size], order[batch_size:]
        b = {k: (v.to(dev) if v is not None else None) for k, v in data.batch(idx, max_len).items()}
        sel = select if select is None or record is None or b["noise"] is None else _Recorder(select)
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            hidden = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        h, w, bias = head.operands(hidden)
        loss = masked_ce(h, w, b["labels"], bias=bias, keep=b["keep"], shift=True, softcap=head.softcap,
                         ref_logprobs=b["ref"] if select is not None else None, select=sel)
        if sel is not None and sel is not select and sel.last is not None:
            record.setdefault("kept_noise", []).append(noise_shares(sel.last.cpu(), b["noise"].cpu()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


class _Recorder:
    """Wraps a ``select`` policy and keeps its last keep mask (for the noise-share record)."""

    def __init__(self, select: Callable) -> None:
        self.select = select
        self.last: torch.Tensor | None = None

    def __call__(self, stats):
        self.last = self.select(stats)
        return self.last


def clone_model(model):
    """A deep copy (the fine-tuning runs all start from the same base weights)."""
    return copy.deepcopy(model)


def count_params(model) -> int:
    """All parameters, embeddings and LM head included."""
    return int(sum(p.numel() for p in model.parameters()))


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def with_lora(model, r: int = 8, alpha: int | None = None, seed: int = 0):
    """Wrap ``model`` with peft LoRA adapters on attention and MLP projections.

    Embeddings and the LM head stay frozen (only the adapters train). Needs ``peft``
    (``pip install -e .[xtf]``).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected a positive int, got {r!r}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is in the xtf extra
        raise ImportError("the LoRA regime needs peft: pip install -e .[xtf]") from e
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


@torch.no_grad()
def teacher_forced_logprobs(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> list[np.ndarray]:
    """Gold-token log-probs under teacher forcing, per sequence (float32 ``[len]``, NaN at 0).

    ``masked_ce(..., shift=True, return_stats=True)`` on the decoder's final hidden states and
    the LM head (no logits materialised).
    """
    if not seqs:
        raise ValueError("seqs: expected at least one sequence")
    model.eval()
    dec, head = model.get_decoder(), lm_head_spec(model)
    out: list[np.ndarray] = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        L = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        hidden = dec(input_ids=ids, attention_mask=mask).last_hidden_state
        h, w, bias = head.operands(hidden)
        _, st = masked_ce(h, w, ids.masked_fill(mask == 0, -100), bias=bias, softcap=head.softcap, shift=True,
                          reduction="sum", return_stats=True)
        lp = st.logprob.float().numpy()
        out.extend(lp[i, : len(c)].copy() for i, c in enumerate(chunk))
    return out


_ANS = re.compile(r"The answer is (-?\d+)")


def extract_answer(text: str) -> int | None:
    """The integer after the first "The answer is" in ``text`` (None when absent)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    m = _ANS.search(text)
    return int(m.group(1)) if m else None


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 96, batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, stops at ``</s>``)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts: expected a non-empty sequence of str")
    model.eval()
    outs: list[str] = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    dev = next(model.parameters()).device
    for s in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[s : s + batch_size]]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, L - len(e) :] = torch.tensor(e)
            mask[i, L - len(e) :] = 1
        new = min(max_new_tokens, model.config.max_position_embeddings - L)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
        outs.extend(tokenizer.decode(g[L:].cpu(), skip_special_tokens=True) for g in gen)
    return outs


def exact_match(model, tokenizer, examples: Sequence[MathExample], **kw) -> tuple[float, list[str]]:
    """Exact-match accuracy of the final answer ("The answer is N") with greedy decoding.

    Returns:
        (accuracy in [0, 1], generated texts).
    """
    if not examples or not all(isinstance(e, MathExample) for e in examples):
        raise ValueError("examples: expected a non-empty sequence of MathExample")
    texts = greedy_answers(model, tokenizer, [e.prompt for e in examples], **kw)
    correct = sum(extract_answer(t) == e.answer for t, e in zip(texts, examples))
    return correct / len(examples), texts
