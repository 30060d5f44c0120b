"""masked_ce(position_ids=...) on packed rows == each document run alone (loss, gradients, stats).

The labels at document starts are real token ids here (no collator wrote -100 there), so the
document rule is what makes the packed and per-document results agree.
"""

from __future__ import annotations

import pytest
import torch

from xtf_kernels import masked_ce
from xtf_kernels.documents import (
    document_bounds,
    document_starts,
    documents,
    position_ids_from_cu_seqlens,
    starts_from_cu_seqlens,
)
from xtf_kernels.integrations.distributed import count_kept_tokens, global_num_items

D, V = 16, 37
#: two packed rows of the same length: documents of lengths (1, 5, 7) and (6, 7)
ROWS = ((1, 5, 7), (6, 7))


def _packed(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    L = sum(ROWS[0])
    hidden = (torch.randn(len(ROWS), L, D, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    labels = torch.randint(0, V, (len(ROWS), L), generator=g)
    labels[torch.rand(len(ROWS), L, generator=g) < 0.15] = -100
    keep = torch.rand(len(ROWS), L, generator=g) < 0.75
    ref = torch.randn(len(ROWS), L, generator=g).double() - 3.0
    pos = torch.cat([torch.cat([torch.arange(n) for n in lens]).unsqueeze(0) for lens in ROWS])
    return hidden, weight, labels, keep, ref, pos


def _docs():
    """(row, start, length) of every document."""
    out = []
    for r, lens in enumerate(ROWS):
        s = 0
        for n in lens:
            out.append((r, s, n))
            s += n
    return out


def _run(hidden, weight, labels, keep, ref, backend, reduction, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss, stats = masked_ce(h, w, labels, keep=keep, ref_logprobs=ref, shift=True, reduction=reduction,
                            return_stats=True, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), stats, h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_packed_equals_per_document_runs(backend, device, reduction):
    hidden, weight, labels, keep, ref, pos = (t.to(device) for t in _packed())
    loss, stats, dh, dw = _run(hidden, weight, labels, keep, ref, backend, reduction, position_ids=pos)

    n_total = count_kept_tokens(labels, keep, position_ids=pos)
    ref_loss = torch.zeros((), dtype=torch.float64, device=device)
    ref_dh = torch.zeros_like(hidden)
    ref_dw = torch.zeros_like(weight)
    for r, s, n in _docs():
        sl = (slice(r, r + 1), slice(s, s + n))
        kw = {"num_items": n_total} if reduction == "mean" else {}
        l_d, st_d, dh_d, dw_d = _run(hidden[sl], weight, labels[sl], keep[sl], ref[sl], backend,
                                     reduction, **kw)
        if reduction == "none":
            torch.testing.assert_close(loss[sl], l_d, atol=1e-5, rtol=1e-5)
        else:
            ref_loss += l_d.double()
        for name in ("logprob", "prob", "entropy", "lse", "logprob_delta", "keep"):
            got, want = getattr(stats, name)[sl], getattr(st_d, name)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)
        ref_dh[sl] = dh_d
        ref_dw += dw_d
    if reduction != "none":
        torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dh, ref_dh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dw, ref_dw, atol=1e-5, rtol=1e-4)
    # the rule matters: without position_ids the documents' first labels are trained
    loss_plain = _run(hidden, weight, labels, keep, ref, backend, "sum")[0]
    assert not torch.allclose(loss_plain, _run(hidden, weight, labels, keep, ref, backend, "sum",
                                               position_ids=pos)[0])


def test_document_start_statistics_are_nan_and_keep_false():
    hidden, weight, labels, keep, ref, pos = _packed()
    _, stats = masked_ce(hidden, weight, labels, shift=True, position_ids=pos, return_stats=True,
                         backend="torch")
    starts = document_starts(pos)
    assert torch.isnan(stats.lse[starts]).all() and not stats.keep[starts].any()
    assert not torch.isnan(stats.lse[~starts & (labels != -100)]).any()


def test_select_sees_no_document_start():
    hidden, weight, labels, keep, ref, pos = _packed()
    seen = []

    def select(s):
        seen.append(torch.isnan(s.lse).clone())
        return s.prob < 2.0

    masked_ce(hidden, weight, labels, shift=True, position_ids=pos, select=select, backend="torch")
    assert seen and seen[0][document_starts(pos)].all()


def test_counts_follow_the_rule():
    hidden, weight, labels, keep, ref, pos = _packed()
    n = count_kept_tokens(labels, keep, position_ids=pos)
    per_doc = sum(int(count_kept_tokens(labels[r:r + 1, s:s + k], keep[r:r + 1, s:s + k])) for r, s, k in _docs())
    assert int(n) == per_doc < int(count_kept_tokens(labels, keep))
    batches = [{"labels": labels, "xtf_keep": keep, "position_ids": pos}, (labels, keep, pos)]
    assert int(global_num_items(batches)) == 2 * per_doc
    # the loss's own divisor: the mean is the sum over the same tokens
    _, stats = masked_ce(hidden, weight, labels, keep=keep, shift=True, position_ids=pos,
                         return_stats=True, backend="torch")
    assert int(stats.keep.sum()) == per_doc


def test_num_items_zero_when_only_document_starts_are_kept():
    hidden, weight, labels, keep, ref, pos = _packed()
    only_starts = document_starts(pos)
    assert int(count_kept_tokens(labels, only_starts, position_ids=pos)) == 0
    h = hidden.clone().requires_grad_(True)
    loss = masked_ce(h, weight, labels, keep=only_starts, shift=True, position_ids=pos, num_items=0,
                     backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any()
    with pytest.raises(ValueError, match="num_items"):
        masked_ce(hidden, weight, labels, keep=keep, shift=True, position_ids=pos, num_items=0, backend="torch")


def test_compiled_step_with_position_ids_matches_eager():
    hidden, weight, labels, keep, ref, pos = _packed()
    lin = torch.nn.Linear(D, D)
    w = torch.nn.Parameter(weight.clone())

    def step(x, y, k, p):
        loss, stats = masked_ce(lin(x), w, y, keep=k, shift=True, position_ids=p, return_stats=True,
                                backend="torch")
        return loss, stats.lse

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        loss, lse = fn(hidden, labels, keep, pos)
        loss.backward()
        results.append((loss.detach(), lse, w.grad.clone(), lin.weight.grad.clone()))
        w.grad = lin.weight.grad = lin.bias.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isnan(results[1][1][document_starts(pos)]).all()


def test_position_ids_validation():
    hidden, weight, labels, keep, ref, pos = _packed()
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        masked_ce(hidden, weight, labels, shift=True, position_ids=pos[:1])
    with pytest.raises(TypeError, match="position_ids: expected an integer"):
        masked_ce(hidden, weight, labels, shift=True, position_ids=pos.float())
    with pytest.raises(ValueError, match="position_ids: only used with shift=True"):
        masked_ce(hidden, weight, labels, shift=False, position_ids=pos)
    with pytest.raises(TypeError, match="position_ids"):
        count_kept_tokens(labels, position_ids=pos.tolist())


def test_position_ids_from_cu_seqlens():
    cu = torch.tensor([0, 1, 6, 13], dtype=torch.int32)
    torch.testing.assert_close(position_ids_from_cu_seqlens(cu, 13), _packed()[5][:1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        position_ids_from_cu_seqlens(torch.tensor([1, 4]), 13)


def test_document_bounds_one_layout_from_position_ids_or_offsets():
    """The loss, the attention scorer and packed scoring read documents from one place."""
    pos = _packed()[5]  # documents (1, 5, 7) and (6, 7)
    d = document_bounds(document_starts(pos))
    assert d.start[0].tolist() == [0, 1, 1, 1, 1, 1, 6, 6, 6, 6, 6, 6, 6]
    assert d.end[0].tolist() == [1] + [6] * 5 + [13] * 7
    assert d.start[1].tolist() == [0] * 6 + [6] * 7 and d.end[1].tolist() == [6] * 6 + [13] * 7
    cu = torch.tensor([0, 1, 6, 13, 19, 26])  # the same documents over the flattened 2 * 13 tokens
    for got in (documents(pos, None, 2, 13, pos.device), documents(None, cu, 2, 13, pos.device)):
        assert torch.equal(got.start, d.start) and torch.equal(got.end, d.end)
    one = torch.tensor([0, 1, 6])  # a single row: position ids are the offsets from the start
    assert torch.equal(
        position_ids_from_cu_seqlens(one, 13)[0],
        torch.arange(13) - document_bounds(starts_from_cu_seqlens(one, 13)[None]).start[0],
    )
    with pytest.raises(ValueError, match="starts"):
        document_bounds(pos)  # positions, not starts
    with pytest.raises(ValueError, match="cu_seqlens"):
        starts_from_cu_seqlens(cu.float(), 26)
