"""Training with gradient filtering: loss curves of a small model with ``grad_filter`` on and off.

A tiny Llama (2 layers, hidden 64, vocabulary 4096, batches of 8 x 64 tokens, fp32 master weights) learns a synthetic
language whose next-token law has a shared Zipf tail (most of the vocabulary is rare in every
context, as in real text): each token has 8 successors that take 70% of the mass, the rest
follows a global Zipf law. The loss is ``masked_ce`` on the final hidden states and the LM
head, both cast to bf16 (what bf16 autocast hands the loss; the "auto" threshold follows the
inputs' dtype: bf16 eps / 32 = 2.4e-4), with

* ``off``: ``grad_filter=None`` (exact);
* ``auto``: ``grad_filter="auto"`` (threshold only, cut-cross-entropy's rule);
* ``bound``: ``GradFilter(max_skipped=1e-2)`` (rows whose skipped mass would exceed 1e-2 go dense).

Every arm sees the same batches and initialisation per seed. Written to ``--out``: one CSV row
per (arm, seed, step) with the training loss and the mean skipped |gradient-logit| mass per
kept token (``TokenStats.grad_skipped``), the held-out loss every ``--eval-every`` steps, and a
PNG of the curves (mean over seeds, band = min..max over seeds).

    python benchmarks/grad_filter_training.py                  # 200 steps, seeds 0-2
    python benchmarks/grad_filter_training.py --steps 60 --seeds 0,1 --out /tmp/gf
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the arms: name -> grad_filter argument (built lazily: GradFilter needs torch)
ARMS = ("off", "auto", "bound")


@dataclass(frozen=True)
class Setup:
    """The model, data and optimiser of one run."""

    vocab: int = 4096
    hidden: int = 64
    layers: int = 2
    seq: int = 64
    batch: int = 8
    lr: float = 3e-3
    successors: int = 8
    successor_mass: float = 0.7
    zipf: float = 1.1
    eval_batches: int = 4


def grad_filter_arg(arm: str):
    """The ``grad_filter`` argument of an arm."""
    from xtf_kernels import GradFilter

    table = {"off": None, "auto": "auto", "bound": GradFilter(max_skipped=1e-2)}
    if arm not in table:
        raise ValueError(f"arm: expected one of {ARMS}, got {arm!r}")
    return table[arm]


def language(setup: Setup, seed: int = 1234):
    """The synthetic language's transition matrix ``[V, V]`` (fp32 rows summing to 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    V = setup.vocab
    ranks = torch.randperm(V, generator=g).double()
    unigram = (1.0 + ranks).pow(-setup.zipf)
    unigram /= unigram.sum()
    succ = torch.multinomial(unigram.float(), V * setup.successors, replacement=True, generator=g)
    T = (1.0 - setup.successor_mass) * unigram.float().expand(V, V).clone()
    T.scatter_add_(1, succ.view(V, setup.successors),
                   torch.full((V, setup.successors), setup.successor_mass / setup.successors))
    return T / T.sum(1, keepdim=True)


def sample(T, n: int, seq: int, seed: int):
    """``n`` sequences of ``seq`` tokens (int64 ``[n, seq]``) from the transition matrix ``T``
    (or its row-wise cumulative sums, :func:`cdf`, which is faster)."""
    import torch

    C = T if bool((T[:, -1] > 0.999).all()) else cdf(T)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, seq, generator=g)
    x = torch.empty(n, seq, dtype=torch.int64)
    x[:, 0] = torch.randint(0, C.shape[0], (n,), generator=g)
    for t in range(1, seq):
        rows = C.index_select(0, x[:, t - 1])
        x[:, t] = torch.searchsorted(rows, u[:, t : t + 1].contiguous()).squeeze(1).clamp_(max=C.shape[0] - 1)
    return x


def cdf(T):
    """Row-wise cumulative sums of the transition matrix (fp64, the last column 1)."""
    C = T.double().cumsum(1)
    C /= C[:, -1:].clone()
    return C


def _model(setup: Setup, seed: int):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=2 * setup.hidden,
        num_hidden_layers=setup.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=setup.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def _loss(model, ids, grad_filter):
    """(mean CE, mean skipped mass per kept token) of next-token prediction on ``ids``."""
    import torch

    from xtf_kernels import masked_ce

    h = model.model(input_ids=ids).last_hidden_state
    w = model.lm_head.weight
    loss, st = masked_ce(h.to(torch.bfloat16), w.to(torch.bfloat16), ids, shift=True,
                         grad_filter=grad_filter, return_stats=True)
    return loss, st.grad_skipped


def train_arm(arm: str, seed: int, steps: int, setup: Setup, T, eval_every: int = 20) -> list[dict]:
    """One run: a row per step (``loss``, ``skipped``: mean mass per kept token, filled once the
    backward has run; ``eval``: held-out loss on its steps, else None)."""
    import torch

    gf = grad_filter_arg(arm)
    model = _model(setup, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0)
    held = sample(T, setup.eval_batches * setup.batch, setup.seq, seed=10_000 + seed)
    rows = []
    for step in range(1, steps + 1):
        ids = sample(T, setup.batch, setup.seq, seed=seed * 100_003 + step)
        loss, skipped = _loss(model, ids, gf)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sk = 0.0 if skipped is None else float(skipped[~torch.isnan(skipped)].mean())
        row = {"arm": arm, "seed": seed, "step": step, "loss": float(loss.detach()), "skipped": sk, "eval": None}
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                row["eval"] = float(sum(_loss(model, held[i:i + setup.batch], None)[0]
                                        for i in range(0, held.shape[0], setup.batch)) / setup.eval_batches)
        rows.append(row)
    return rows


def run(arms=ARMS, seeds=(0, 1, 2), steps: int = 200, setup: Setup | None = None,
        eval_every: int = 20) -> list[dict]:
    """Every (arm, seed) run; rows as :func:`train_arm`."""
    setup = setup or Setup()
    T = cdf(language(setup))
    rows = []
    for seed in seeds:
        for arm in arms:
            rows += train_arm(arm, seed, steps, setup, T, eval_every)
    return rows


def final_losses(rows: list[dict], arm: str, last: int = 20) -> list[float]:
    """Per seed: the mean training loss over the arm's ``last`` steps."""
    out = {}
    for r in rows:
        if r["arm"] == arm:
            out.setdefault(r["seed"], []).append(r["loss"])
    return [sum(v[-last:]) / len(v[-last:]) for _, v in sorted(out.items())]


def summary(rows: list[dict]) -> str:
    """Final losses (last 20 steps and held-out) and mean skipped mass per arm, as text."""
    lines = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        fl = final_losses(rows, arm)
        ev = [r["eval"] for r in rows if r["arm"] == arm and r["eval"] is not None and r["step"] == max(
            x["step"] for x in rows if x["arm"] == arm)]
        sk = [r["skipped"] for r in rows if r["arm"] == arm]
        lines.append(f"{arm:>6}: final train loss (last 20 steps) per seed "
                     f"{', '.join(f'{v:.3f}' for v in fl)}; held-out {', '.join(f'{v:.3f}' for v in ev)}; "
                     f"mean skipped mass/token {sum(sk) / len(sk):.2e}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Training-loss curves (mean over seeds, band min..max) and the skipped mass per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
        for ax, key in zip(axes, ("loss", "skipped")):
            curves = [[r[key] for r in rows if r["arm"] == arm and r["seed"] == s] for s in seeds]
            n = min(len(c) for c in curves)
            steps = list(range(1, n + 1))
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(steps, mean, color=f"C{k}", label=f"{arm} ({len(seeds)} seeds)")
            ax.fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                            [max(c[i] for c in curves) for i in range(n)], color=f"C{k}", alpha=0.2)
    axes[0].set_ylabel("training loss (nats)")
    axes[1].set_ylabel("skipped |gradient-logit| mass per token")
    axes[1].set_yscale("symlog", linthresh=1e-4)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring). Returns the exit code."""
    ap = argparse.ArgumentParser(prog="python benchmarks/grad_filter_training.py", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the model is tiny, more threads only contend)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="grad_filter_training_cpu", help="stem of the CSV and PNG names")
    a = ap.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in a.seeds.split(","))
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {a.seeds!r}")
    arms = tuple(a.arms.split(","))
    if any(x not in ARMS for x in arms):
        ap.error(f"--arms: expected names from {ARMS}, got {a.arms!r}")
    if a.steps < 1 or a.eval_every < 1 or a.threads < 1:
        ap.error("--steps, --eval-every and --threads: expected >= 1")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = run(arms, seeds, a.steps, eval_every=a.eval_every)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{a.name}.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["arm", "seed", "step", "loss", "skipped", "eval"])
        wr.writeheader()
        wr.writerows(rows)
    text = summary(rows)
    plot(rows, out / f"{a.name}.png",
         f"grad_filter on a tiny Llama (V={Setup().vocab}, bf16 loss inputs), {a.steps} steps")
    print(text)
    print(f"{time.perf_counter() - t0:.0f} s; wrote {out / (a.name + '.csv')} and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
