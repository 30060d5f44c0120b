"""Task relevance as the released implementation computes it (``official`` preset).

``rel`` = cosine similarity between a token's vector and the domain vector (higher = more
relevant). With ``tr_source="isolated"`` a token's vector is the model's final hidden state
(after the final norm) of the token run alone (``input_ids = [[id]]``, no BOS); the domain
vector is the mean, over the domain words, of the mean final hidden state of each word's
tokens run alone. With ``tr_source="input"`` both use input-embedding rows instead.

Scores are per token id: the released code caches them by the decoded, stripped token string,
so ids that decode to the same text (e.g. ``"the"`` and ``" the"``) share the first one's
score there; here each id keeps its own (docs/xtf.md).

When no domain words are given, :func:`frequent_words` picks the most frequent words of the
responses (letters, single digits or operator symbols; English stop words left out).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["GSM8K_DOMAIN_WORDS", "STOP_WORDS", "frequent_words", "domain_vector", "token_relevance"]

#: the released implementation's GSM8K domain words
GSM8K_DOMAIN_WORDS: tuple[str, ...] = (*(str(i) for i in range(1, 11)), "+", "-", "*", "/", "=", "maths")

#: English stop words left out of the default domain words
STOP_WORDS: frozenset[str] = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves s t let also
""".split())

_WORD_RE = re.compile(r"[A-Za-z]+|[0-9]|[+\-*/=]")


def frequent_words(texts: Iterable[str], top: int = 16, stop_words: frozenset[str] = STOP_WORDS) -> list[str]:
    """The ``top`` most frequent words of ``texts`` (ties: first seen first).

    A word is a run of letters, a single digit or one of ``+ - * / =``; words whose lower case
    is in ``stop_words`` are left out.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top: expected a positive int, got {top!r}")
    counter: Counter[str] = Counter()
    for t in texts:
        counter.update(w for w in _WORD_RE.findall(t) if w.lower() not in stop_words)
    return [w for w, _ in counter.most_common(top)]


def _final_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states ``[B, L, D]`` of unpadded rows ``ids`` ``[B, L]``."""
    from .scorers import decoder_hidden

    return decoder_hidden(model, ids, torch.ones_like(ids))


@torch.no_grad()
def domain_vector(model: torch.nn.Module, tokenizer: Any, words: Sequence[str], source: str = "isolated",
                  ) -> tuple[torch.Tensor, list[str], list[str]]:
    """The domain vector of ``words`` (fp64 ``[D]``), the words used and those skipped (no tokens).

    ``source="isolated"``: each word's tokens run alone through the model (no special tokens),
    the mean of their final hidden states; ``"input"``: the mean of their input-embedding rows.
    The domain vector is the mean of the word vectors.
    """
    if source not in ("isolated", "input"):
        raise ValueError(f"source: expected 'isolated' or 'input', got {source!r}")
    if isinstance(words, str) or not all(isinstance(w, str) for w in words):
        raise TypeError("domain_words: expected a sequence of str")
    emb = model.get_input_embeddings().weight
    vecs, used, skipped = [], [], []
    for w in words:
        ids = list(tokenizer(w, add_special_tokens=False)["input_ids"])
        if not ids:
            skipped.append(w)
            continue
        t = torch.tensor([ids], dtype=torch.long, device=emb.device)
        v = _final_hidden(model, t)[0] if source == "isolated" else emb[t[0]]
        vecs.append(v.double().mean(0))
        used.append(w)
    if not vecs:
        raise ValueError(f"domain_words: none of {list(words)!r} has a token under this tokenizer")
    return torch.stack(vecs).mean(0), used, skipped


@torch.no_grad()
def token_relevance(model: torch.nn.Module, token_ids: np.ndarray, domain: torch.Tensor, source: str = "isolated",
                    batch_size: int = 256) -> np.ndarray:
    """Cosine similarity of each token's vector to ``domain`` (float32 ``[K]``).

    Args:
        model: the frozen base model.
        token_ids: int ``[K]`` distinct token ids.
        domain: fp64 ``[D]`` (:func:`domain_vector`).
        source: ``"isolated"`` (each id run alone, ``[B, 1]`` batches: one forward per batch) or
            ``"input"`` (its input-embedding row).
        batch_size: ids per forward.
    """
    if source not in ("isolated", "input"):
        raise ValueError(f"source: expected 'isolated' or 'input', got {source!r}")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    emb = model.get_input_embeddings().weight
    out = np.empty(ids.size, dtype=np.float32)
    for s in range(0, ids.size, batch_size):
        t = torch.from_numpy(ids[s : s + batch_size]).to(emb.device)
        h = _final_hidden(model, t[:, None])[:, 0] if source == "isolated" else emb[t]
        v = domain.to(h.device, torch.float64)
        # float32 like the released scores (a float32 hidden state and domain vector)
        cos = torch.nn.functional.cosine_similarity(h.float(), v.float()[None, :], dim=1)
        out[s : s + batch_size] = cos.cpu().numpy()
    return out
