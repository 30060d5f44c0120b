"""Training with ``grad_filter="auto"`` follows the exact run (issue 20, part 1).

A short version of ``benchmarks/grad_filter_training.py``: a tiny Llama, 60 steps, 2 seeds,
the loss on bf16 casts of the hidden states and the head (bf16's "auto" threshold, 2.4e-4).
The filtered runs' final loss must lie within the exact runs' seed spread plus a margin, and
the filter must have skipped a real share of the gradient mass (otherwise the comparison
could not fail).
"""

from __future__ import annotations

import pytest

from benchmarks import grad_filter_training as gft

#: nats above / below the exact runs' range that the filtered runs may reach (their seed
#: spread at 60 steps is ~0.03 nats; a filter that skipped every column would leave the
#: loss at its initial ~8.3 nats, ln 4096)
MARGIN = 0.05


@pytest.fixture(scope="module")
def runs():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster and deterministic
    try:
        return gft.run(arms=("off", "auto"), seeds=(0, 1), steps=60, eval_every=60)
    finally:
        torch.set_num_threads(threads)


def test_filtered_training_stays_within_the_seed_spread(runs):
    off = gft.final_losses(runs, "off")
    auto = gft.final_losses(runs, "auto")
    first = [r["loss"] for r in runs if r["step"] == 1]
    assert max(off) < min(first) - 1.0, "the model did not learn: the comparison would be void"
    for v in auto:
        assert min(off) - MARGIN <= v <= max(off) + MARGIN, (auto, off)


def test_the_filter_skipped_gradient_mass(runs):
    skipped = [r["skipped"] for r in runs if r["arm"] == "auto" and r["step"] > 30]
    assert sum(skipped) / len(skipped) > 0.01  # a real share of |d loss / d logit| mass
    assert all(r["skipped"] == 0.0 for r in runs if r["arm"] == "off")


def test_arms_and_command_line_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="arm: expected one of"):
        gft.grad_filter_arg("nope")
    for bad in (["--seeds", "a"], ["--arms", "off,nope"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            gft.main([*bad, "--out", str(tmp_path)])
