"""Quick start: masked_ce in a custom loop, with per-token statistics and a dynamic select rule.

Run: python examples/quickstart.py   (CPU, a few seconds)
"""

from __future__ import annotations

import torch

import xtf_kernels
from xtf_kernels import TokenStats, masked_ce


def main() -> None:
    torch.manual_seed(0)
    B, L, D, V = 8, 64, 128, 4096
    body = torch.nn.Sequential(torch.nn.Embedding(V, D), torch.nn.Linear(D, D), torch.nn.GELU())
    head = torch.nn.Linear(D, V, bias=False)
    opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=3e-3)
    ids = torch.randint(0, V, (B, L))
    labels = ids.clone()
    labels[:, : L // 4] = -100  # the prompt is never trained on

    def knowledge_novelty_rule(s: TokenStats) -> torch.Tensor:
        """The XTF KN rule: drop tokens the model already predicts with p > 0.95."""
        return ~(s.prob > 0.95)

    print(f"backends: {xtf_kernels.backend_status()}")
    for step in range(20):
        loss, stats = masked_ce(body(ids), head.weight, labels, shift=True,
                                select=knowledge_novelty_rule, return_stats=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        scored = ~torch.isnan(stats.prob)
        kept = stats.keep.sum().item() / scored.sum().item()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.4f}  kept {kept:6.1%}  "
                  f"mean entropy {stats.entropy[scored].mean().item():.3f} nats")


if __name__ == "__main__":
    main()
