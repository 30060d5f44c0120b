"""VocabParallel's own checks, without processes: each error names the argument."""

from __future__ import annotations

import pytest
import torch

import xtf_kernels
from xtf_kernels import VocabParallel, masked_ce


@pytest.mark.parametrize(
    "args, kwargs, kind",
    [
        ((3, 3), {}, ValueError),
        ((-1, 4), {}, ValueError),
        ((5, 2), {}, ValueError),
        ((0.0, 2), {}, TypeError),
        ((0, True), {}, TypeError),
        ((0, 4), {"vocab_size": 3}, ValueError),
        ((0, 4), {"group": "default"}, TypeError),
    ],
)
def test_vocab_parallel_checks_its_fields(args, kwargs, kind) -> None:
    with pytest.raises(kind, match="vocab_parallel"):
        VocabParallel(*args, **kwargs)


def test_vocab_parallel_is_frozen_and_exported() -> None:
    vp = VocabParallel(0, 4)
    assert xtf_kernels.VocabParallel is VocabParallel and "VocabParallel" in xtf_kernels.__all__
    with pytest.raises(AttributeError):
        vp.start = 1  # type: ignore[misc]
    assert vp == VocabParallel(0, 4)


def test_without_a_process_group_it_says_so() -> None:
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(
        RuntimeError, match="vocab_parallel: needs an initialized torch.distributed"
    ):
        masked_ce(h, w, y, vocab_parallel=VocabParallel(0, 5))
    with pytest.raises(TypeError, match="vocab_parallel: expected a xtf_kernels.VocabParallel"):
        masked_ce(h, w, y, vocab_parallel=(0, 5))
