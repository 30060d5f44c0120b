"""Benchmark problems: shapes, cases, results and the inputs (hidden states, head, labels)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: N tokens, hidden D, vocabulary V, dtype, ignored share, softcap."""

    name: str
    N: int
    D: int
    V: int
    dtype: str
    ignore: float = 0.2
    softcap: float | None = None
    logits: str = "peaked"  # "peaked" (trained-model scale, see make_inputs) or "random"
    bias: bool = False  # an N(0, 1) LM-head bias (compared with xtf and eager only)


CPU_SHAPES = {
    "S1": Shape("S1", 4096, 1024, 32000, "float32", logits="random"),
    "S2": Shape("S2", 2048, 2048, 128256, "bfloat16", logits="random"),
    # the bf16 epilogue row (issue 10, item 4): S2 with an LM-head bias and a Gemma-2 softcap
    "S2-bias-cap": Shape(
        "S2-bias-cap", 2048, 2048, 128256, "bfloat16", softcap=30.0, logits="random", bias=True
    ),
    # gradient filtering (issue 20): trained-model-scale logits, where most |d loss / d logit|
    # are negligible (see make_inputs); the filtered methods run on peaked shapes only
    "S1-peaked": Shape("S1-peaked", 4096, 1024, 32000, "float32"),
    "S2-peaked": Shape("S2-peaked", 2048, 2048, 128256, "bfloat16"),
}
GPU_SHAPES = {
    "llama3-8k": Shape("llama3-8k", 8192, 4096, 128256, "bfloat16"),
    "llama3-16k": Shape("llama3-16k", 16384, 4096, 128256, "bfloat16"),
    "llama3-32k": Shape("llama3-32k", 32768, 4096, 128256, "bfloat16"),
    "gemma2-8k": Shape("gemma2-8k", 8192, 2304, 256000, "bfloat16", softcap=30.0),
    "qwen25-16k": Shape("qwen25-16k", 16384, 3584, 152064, "bfloat16"),
}
QUICK_SHAPES = {
    "Q1": Shape("Q1", 256, 64, 1000, "float32", logits="random"),
    "Q2": Shape("Q2", 128, 64, 2048, "bfloat16"),
}


#: the three-GEMM floors: ``gemm-floor`` in the inputs' dtype (the reference for ratios when
#: measured); ``gemm-floor-fp32`` with half-precision operands upcast to fp32 inside the step,
#: the floor of a CPU without native bf16 GEMMs (ATen's bf16 ``mm`` there is a slow fallback
#: kernel, while the CPU backends upcast): the ratio reference when ``gemm-floor`` is not run
FLOORS = ("gemm-floor", "gemm-floor-fp32")


PLAIN_PEERS = ("eager", "torch-lce", "cce-exact", "cce", "liger")


SCENARIOS_XTF = ("stats", "mask0", "mask30", "mask50", "xtf-step")

#: gradient-filter variants, appended to an xtf method as ``xtf-<backend>+<variant>`` (peaked
#: shapes, scenarios plain and xtf-step): ``gf-auto`` is ``grad_filter="auto"`` (the dtype's
#: eps / 32, no mass bound: cut-cross-entropy's rule); ``gf-<float>`` adds that bound on the
#: |gradient-logit| mass skipped per row (``GradFilter(max_skipped=...)``). 1e-2 bounds each
#: row's dX error by 1e-2 x the largest weight-row norm, the order of bf16 rounding (eps 7.8e-3).
GRAD_FILTERS = ("gf-auto", "gf-1e-2")
SCENARIOS_GRAD_FILTER = ("plain", "xtf-step")


def grad_filter_of(variant: str):
    """The ``grad_filter`` argument a method suffix means (``gf-auto`` or ``gf-<max_skipped>``)."""
    from xtf_kernels import GradFilter

    if variant == "gf-auto":
        return "auto"
    if variant.startswith("gf-"):
        try:
            return GradFilter(max_skipped=float(variant[3:]))
        except ValueError:
            pass
    raise ValueError(
        f"method: unknown gradient-filter variant {variant!r} (expected gf-auto or gf-<float>)"
    )


#: chunk-size variants, appended to an xtf method as ``xtf-<backend>+<variant>`` (CPU fp32 shapes,
#: plain scenario): ``ce-vd`` runs with ``chunk_elems = V * D``, a logits buffer as large as the
#: fp32 dW accumulator the chunked plan holds (fewer chunks: each re-packs the head for its
#: GEMMs); ``ce-<int>`` with that many elements. The default is ``DEFAULT_CHUNK_ELEMS``, which the
#: native backend's gradient sweep widens to ``min(2 * chunk_elems, V * D)`` (``chunk_up_to_dw``):
#: where ``V * D`` is within twice the default (S1), ``xtf-native+ce-vd`` runs the default plan.
CHUNK_VARIANTS = ("ce-vd",)


def chunk_elems_of(variant: str, shape: Shape) -> int:
    """The ``chunk_elems`` a method suffix means (``ce-vd`` or ``ce-<int>``) for ``shape``."""
    if variant == "ce-vd":
        return shape.V * shape.D
    if variant.startswith("ce-") and variant[3:].isdigit() and int(variant[3:]) > 0:
        return int(variant[3:])
    raise ValueError(f"method: unknown chunk variant {variant!r} (expected ce-vd or ce-<positive int>)")


@dataclass
class Case:
    """One measurement: a shape, a scenario and a method."""

    shape: Shape
    scenario: str
    method: str
    reps: int = 3
    warmup: int = 1


@dataclass
class Result:
    """One measured (or skipped) case: times in seconds, peak memory in MB, a note when not run."""

    shape: str
    N: int
    D: int
    V: int
    dtype: str
    scenario: str
    method: str
    kept_rows: int = 0
    fwd_s: float | None = None
    bwd_s: float | None = None
    total_s: float | None = None
    peak_mb: float | None = None
    reps: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


def make_inputs(shape: Shape, device: str, seed: int = 0):
    """hidden [N, D], weight [V, D] (shape.dtype), labels [N] int64 with ``ignore`` at -100.

    The tensors are generated on the CPU once per (shape, seed) and cached (the last one only):
    every case of a shape in one process gets fresh copies on ``device`` without generating
    them again (at gemma2-8k that is ~600M random numbers, seconds per case on a GPU machine's
    CPU, which had run one shape past its time limit).

    ``shape.logits == "random"``: N(0, 0.25) hidden states and a N(0, 1/D) head, so the logits
    are near-uniform over the vocabulary (every softmax entry ~1/V).
    ``"peaked"`` (the default): the scale of a trained model, which is what gradient filtering
    (cut-cross-entropy's ``filter_eps``) depends on. The head gets a shared direction ``u`` whose
    coefficient is a Zipf log-prior (log-probability ``-log(rank)``), the labels are drawn from
    that Zipf law, and every hidden state is ``4 u`` plus a gold component of random strength
    ``U(2, 12)`` along its label's row plus N(0, 0.3^2) noise: most of the softmax mass sits on
    the gold and the frequent tokens, and the mean loss is a few nats (printed by the harness).
    """
    h, w, y = _generate(shape, seed)
    if device == "cpu":  # fresh tensors, as on a device: no case sees another's in-place change
        return h.clone(), w.clone(), y.clone()
    return h.to(device), w.to(device), y.to(device)


@functools.lru_cache(maxsize=1)
def _generate(shape: Shape, seed: int):
    """The CPU tensors of :func:`make_inputs` (cached: the last (shape, seed) only)."""
    import torch

    dt = getattr(torch, shape.dtype)
    g = torch.Generator().manual_seed(seed)
    N, D, V = shape.N, shape.D, shape.V
    if shape.logits == "random":
        h = torch.randn(N, D, generator=g) * 0.5
        w = torch.randn(V, D, generator=g) * D**-0.5
        y = torch.randint(0, V, (N,), generator=g)
    elif shape.logits == "peaked":
        w = torch.randn(V, D, generator=g) * D**-0.5
        perm = torch.randperm(V, generator=g)  # token id -> Zipf rank
        prior = -torch.log1p(perm.double()).float()  # log-prior up to a constant
        u = torch.randn(D, generator=g)
        u /= u.norm()
        c = 4.0
        zipf = 1.0 / (1.0 + torch.arange(V, dtype=torch.float64))
        ranks = torch.multinomial(zipf / zipf.sum(), N, replacement=True, generator=g)
        y = torch.argsort(perm)[ranks]  # rank -> token id
        rows = w[y] - (w[y] @ u)[:, None] * u[None, :]  # gold directions, orthogonal to u
        w += (prior / c)[:, None] * u[None, :]
        strength = 2.0 + torch.rand(N, 1, generator=g) * 10.0
        h = c * u[None, :] + strength * rows / rows.pow(2).sum(1, keepdim=True)
        h += torch.randn(N, D, generator=g) * 0.3
    else:
        raise ValueError(f"shape.logits: expected 'peaked' or 'random', got {shape.logits!r}")
    y[torch.rand(N, generator=g) < shape.ignore] = -100
    return h.to(dt), w.to(dt), y


def mask_share(y, share: float, seed: int = 1):
    """bool keep mask: ``share`` of the scored (non-ignored) tokens set False."""
    import torch

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(y.shape, generator=g) >= share
    return keep.to(y.device)
