"""Inputs and cases of the vocabulary-parallel tests, shared by the spawned ranks and the test
process (every rank builds the same tensors from a seed; each keeps its rows of the head)."""

from __future__ import annotations

import torch

from xtf_kernels import rowwise

V = 101  # prime: no world size divides it
D = 16
B, L = 3, 7

#: (start, stop) per rank, uneven and not in rank order; one shard is 3 ids wide and never a label
SPLITS = {
    2: [(58, 101), (0, 58)],
    4: [(40, 43), (0, 40), (77, 101), (43, 77)],
}
#: the ids no label takes (a rank whose shard holds no gold label)
NO_GOLD = {2: (), 4: (40, 43)}


@rowwise
def confident(s):
    return s.prob <= 0.05


def top_entropy(s):
    """A global (rank-based) rule: the half of the kept tokens with the highest entropy."""
    ent = torch.where(s.keep, s.entropy, torch.full_like(s.entropy, float("-inf")))
    k = max(int(s.keep.sum()) // 2, 1)
    cut = ent.flatten().topk(k).values[-1]
    return ent >= cut


#: every option that changes the per-row math, at once
_ALL_OPTIONS = dict(keep=True, shift=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, bias=True)

#: name -> (dtype, masked_ce keywords beyond hidden/weight/labels; True marks generated tensors)
CASES: dict[str, tuple[torch.dtype, dict]] = {
    "mean": (torch.float32, dict(keep=True)),
    "sum": (torch.float32, dict(keep=True, reduction="sum")),
    "none": (torch.float32, dict(keep=True, reduction="none")),
    "num_items": (torch.float32, dict(keep=True, num_items=40)),
    "everything": (torch.float32, dict(_ALL_OPTIONS, ref_logprobs=True, task_vector=True)),
    "everything_none": (torch.float32, dict(_ALL_OPTIONS, reduction="none")),
    "select_rowwise": (torch.float32, dict(keep=True, select=confident, label_smoothing=0.05)),
    "select_global": (torch.float32, dict(keep=True, select=top_entropy, shift=True)),
    "position_ids": (torch.float32, dict(shift=True, position_ids=True, bias=True)),
    "nothing_kept": (torch.float32, dict(keep=False)),
    "bf16": (
        torch.bfloat16,
        dict(keep=True, shift=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, bias=True),
    ),
}


def inputs(dtype: torch.dtype, world: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole problem: hidden [B, L, D], weight [V, D], labels [B, L], ... (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, L, D, generator=g) * 0.8).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    allowed = torch.tensor(
        [v for v in range(V) if not (NO_GOLD[world] and NO_GOLD[world][0] <= v < NO_GOLD[world][1])]
    )
    labels = allowed[torch.randint(0, allowed.numel(), (B, L), generator=g)]
    labels[torch.rand(B, L, generator=g) < 0.15] = -100
    keep = torch.rand(B, L, generator=g) < 0.7
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        labels=labels,
        keep=keep,
        ref_logprobs=-torch.rand(B, L, generator=g) * 4,
        task_vector=torch.randn(D, generator=g),
        position_ids=torch.tensor(
            [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 1, 2, 0, 1]]
        ),
        upstream=torch.randn(B, L, generator=g),
    )


def call_kwargs(spec: dict, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> dict:
    """The masked_ce keywords of a case (``bias`` is the caller's: the whole or a shard)."""
    kw = {}
    for k, v in spec.items():
        if v is True and k in ("keep", "ref_logprobs", "task_vector", "position_ids"):
            kw[k] = t[k]
        elif k == "keep" and v is False:
            kw[k] = torch.zeros_like(t["keep"])
        elif k != "bias":
            kw[k] = v
    if spec.get("bias"):
        kw["bias"] = bias
    return kw
