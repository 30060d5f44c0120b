"""XTFCollator, global_num_items (single process), DynamicXTF rules, and the example loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xtf_kernels import masked_ce
from xtf_kernels.integrations.collator import XTFCollator
from xtf_kernels.integrations.distributed import count_kept_tokens, global_num_items
from xtf_kernels.xtf.dynamic import DynamicXTF

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- collator
def test_collator_pads_labels_keep_and_ref() -> None:
    recs = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "keep": [1, 1, 0, 1],
         "ref_logprobs": [0.0, -1.0, -2.0, -3.0]},
        {"input_ids": torch.tensor([9, 10]), "labels": None, "keep": [True, False],
         "ref_logprobs": [-0.5, -0.25]},
    ]
    b = XTFCollator(pad_token_id=0)(recs)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, 8], [9, 10, -100, -100]]  # None -> input_ids
    assert b["xtf_keep"].tolist() == [[True, True, False, True], [True, False, False, False]]
    ref = b["xtf_ref_logprobs"]
    assert ref[0].tolist() == [0.0, -1.0, -2.0, -3.0] and torch.isnan(ref[1, 2:]).all()
    left = XTFCollator(0, padding_side="left", pad_to_multiple_of=8, keep_key="k")(recs)
    assert left["input_ids"].shape == (2, 8) and left["input_ids"][1, -2:].tolist() == [9, 10]
    assert left["labels"][1, :6].eq(-100).all() and not left["k"][1, :6].any()
    folded = XTFCollator(0, apply_keep_to_labels=True)(recs)
    assert "xtf_keep" not in folded
    assert folded["labels"].tolist() == [[-100, 6, -100, 8], [9, -100, -100, -100]]
    cut = XTFCollator(0, max_length=3)(recs)
    assert cut["input_ids"].shape == (2, 3) and cut["xtf_keep"][0].tolist() == [True, True, False]
    no_keep = XTFCollator(0)([{"input_ids": [3, 4], "labels": [3, 4]}])
    assert set(no_keep) == {"input_ids", "attention_mask", "labels"}


def test_collator_carries_response_mask() -> None:
    """``response`` (what xtf export writes next to keep) -> ``xtf_response``, padded / packed / cut."""
    recs = [  # xtf export: labels and keep hide the masked token 7; response does not
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "keep": [0, 1, 0, 1], "response": [0, 1, 1, 1]},
        {"input_ids": [9, 10, 11], "labels": [-100, -100, 11], "keep": [0, 0, 1], "response": [False, True, True]},
    ]
    b = XTFCollator(0)(recs)
    assert b["xtf_response"].tolist() == [[False, True, True, True], [False, True, True, False]]
    assert b["labels"].tolist() == [[-100, 6, -100, 8], [-100, -100, 11, -100]]  # unchanged
    left = XTFCollator(0, padding_side="left", max_length=3)(recs)
    assert left["xtf_response"].tolist() == [[False, True, True], [False, True, True]]
    packed = XTFCollator(0, packing=True, pad_to_multiple_of=8)(recs)
    assert packed["xtf_response"].tolist() == [[False, True, True, True, False, True, True, False]]
    assert "xtf_response" not in XTFCollator(0, apply_keep_to_labels=True)(recs)
    assert "xtf_response" not in XTFCollator(0, packing=True, apply_keep_to_labels=True)(recs)
    with pytest.raises(ValueError, match="response present in some records only"):
        XTFCollator(0)([recs[0], {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"records\[0\].response: expected length 4"):
        XTFCollator(0)([{**recs[0], "response": [1, 1]}])


def test_collator_bad_input() -> None:
    c = XTFCollator(0)
    with pytest.raises(ValueError, match="missing field 'input_ids'"):
        c([{"labels": [1]}])
    with pytest.raises(ValueError, match=r"records\[0\].keep: expected length 2"):
        c([{"input_ids": [1, 2], "keep": [1]}])
    with pytest.raises(ValueError, match=r"records\[1\].labels: expected length 1"):
        c([{"input_ids": [1]}, {"input_ids": [1], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="non-empty list"):
        c([])
    with pytest.raises(ValueError, match="ref_logprobs present in some records only"):
        c([{"input_ids": [1], "ref_logprobs": [0.0]}, {"input_ids": [2]}])
    with pytest.raises(ValueError, match="padding_side"):
        XTFCollator(0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id"):
        XTFCollator(-1)


# ---------------------------------------------------------------- global_num_items
def test_global_num_items_counts_shifted_kept_tokens() -> None:
    labels = torch.tensor([[-100, 4, 5, 6], [7, 8, -100, -100]])
    keep = torch.tensor([[True, False, True, True], [True, True, True, True]])
    # shifted: position 0 never counts -> row0 {5,6}, row1 {8}
    assert int(count_kept_tokens(labels, keep)) == 3
    assert int(count_kept_tokens(labels, keep, shift=False)) == 4
    batches = [{"labels": labels, "xtf_keep": keep}, (labels, None), labels]
    assert int(global_num_items(batches)) == 3 + 4 + 4
    with pytest.raises(ValueError, match="keep: expected shape"):
        count_kept_tokens(labels, keep[:, :2])
    with pytest.raises(ValueError, match="at least one micro-batch"):
        global_num_items([])
    with pytest.raises(TypeError, match="list of the step's micro-batches"):
        global_num_items(labels)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no 'labels' field"):
        global_num_items([{"input_ids": labels}])


def test_global_divisor_makes_accumulation_exact() -> None:
    """M micro-batches with num_items = global count == one call on the concatenated batch."""
    g = torch.Generator().manual_seed(0)
    D, V = 16, 50
    w = torch.randn(V, D, generator=g, requires_grad=True)
    parts = []
    for L in (5, 9):
        h = torch.randn(2, L, D, generator=g)
        y = torch.randint(0, V, (2, L), generator=g)
        k = torch.rand(2, L, generator=g) > 0.4
        parts.append((h, y, k))
    n = global_num_items([(y, k) for _, y, k in parts])
    for h, y, k in parts:
        masked_ce(h, w, y, keep=k, shift=True, num_items=n).backward()
    acc = w.grad.clone()
    w.grad = None
    total = sum(masked_ce(h, w, y, keep=k, shift=True, reduction="sum") for h, y, k in parts)
    (total / n).backward()
    torch.testing.assert_close(acc, w.grad)


# ---------------------------------------------------------------- DynamicXTF
def _stats(seed: int = 0, ref: bool = False):
    g = torch.Generator().manual_seed(seed)
    D, V = 8, 6  # small V: probabilities well above 0.95 occur with scaled weights
    h = torch.randn(4, 12, D, generator=g) * 3
    w = torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (4, 12), generator=g)
    y[0, :3] = -100
    r = torch.randn(4, 12, generator=g) - 2 if ref else None
    return h, w, y, r


def test_dynamic_rules_match_their_definitions() -> None:
    h, w, y, r = _stats(ref=True)
    _, st = masked_ce(h, w, y, shift=True, ref_logprobs=r, return_stats=True)
    pol = DynamicXTF(kn_threshold=0.05, entropy_min=0.3, excess_loss_min=0.5)
    m = pol.masks(st)
    cand = st.keep
    assert torch.equal(m["kn"], cand & (st.prob > 0.95))
    assert torch.equal(m["entropy"], cand & (st.entropy < 0.3))
    assert torch.equal(m["excess_loss"], cand & (-(st.logprob - r) < 0.5))
    assert m["kn"].any() and m["entropy"].any() and m["excess_loss"].any()
    # used as select: the loss is the mean over the tokens no rule fires on
    loss = masked_ce(h, w, y, shift=True, ref_logprobs=r, select=pol)
    kept = cand & ~(m["kn"] | m["entropy"] | m["excess_loss"])
    want = masked_ce(h, w, y, shift=True, keep=kept)
    torch.testing.assert_close(loss, want)
    rec = pol.end_step()
    n = float(cand.sum())
    assert rec["tokens"] == n
    assert rec["kn"] == pytest.approx(float(m["kn"].sum()) / n)
    assert rec["any"] == pytest.approx(float((~kept & cand).sum()) / n)
    assert pol.history == [rec]
    summary = pol.step_summary()
    assert summary["xtf/masked_any"] == pytest.approx(rec["any"])


def test_dynamic_keep_ratio_and_errors() -> None:
    h, w, y, r = _stats(seed=1, ref=True)
    _, st = masked_ce(h, w, y, shift=True, ref_logprobs=r, return_stats=True)
    pol = DynamicXTF(kn_threshold=None, excess_loss_keep_ratio=0.6)
    keep = pol(st)
    n = int(st.keep.sum())
    assert int((keep & st.keep).sum()) == -(-6 * n // 10)  # ceil(0.6 n) kept
    excess = -st.logprob_delta
    assert excess[keep & st.keep].min() >= excess[~keep & st.keep].max()
    with pytest.raises(ValueError, match="reference log-probs"):
        masked_ce(h, w, y, shift=True, select=DynamicXTF(kn_threshold=None, excess_loss_min=0.0))
    with pytest.raises(ValueError, match="at least one rule"):
        DynamicXTF(kn_threshold=None)
    with pytest.raises(ValueError, match="exclusive"):
        DynamicXTF(excess_loss_min=0.1, excess_loss_keep_ratio=0.5)
    with pytest.raises(ValueError, match="kn_threshold"):
        DynamicXTF(kn_threshold=1.5)


# ---------------------------------------------------------------- example
def test_example_train_loop_runs_and_learns(tmp_path) -> None:
    pytest.importorskip("transformers")
    data = tmp_path / "export.jsonl"
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_loop
    finally:
        sys.path.pop(0)
    with data.open("w") as f:
        for r in train_loop.synthetic_records(24, 512, seed=1):
            f.write(json.dumps(r) + "\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_loop.py"), "--steps", "12", "--grad-accum", "2",
         "--data", str(data), "--dynamic", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "run" / "losses.json").read_text())
    losses = out["losses"]
    assert len(losses) == 12 and all(x == x for x in losses)
    assert losses[-1] < losses[0] - 0.3  # the repeated patterns are learnt
    assert len(out["dynamic_history"]) == 12


def test_dynamic_kn_cap_follows_the_released_rule() -> None:
    """kn_cap: per row, only p > 1 - kn_threshold AND p > sorted_p[int(n * (1 - cap))] of its candidates."""
    h, w, y, r = _stats()
    _, st = masked_ce(h, w, y, shift=True, return_stats=True)
    pol = DynamicXTF(kn_threshold=0.99, kn_cap=0.25)  # p > 0.01: most tokens pass the absolute cut
    got = pol.masks(st)["kn"]
    assert not pol.rowwise
    want = torch.zeros_like(st.keep)
    for b in range(st.keep.shape[0]):
        idx = [j for j in range(st.keep.shape[1]) if st.keep[b, j]]
        ps = sorted(float(st.prob[b, j]) for j in idx)
        for j in idx:
            p = float(st.prob[b, j])
            want[b, j] = p > 0.01 and p > ps[int(len(idx) * (1 - 0.25))]
    assert torch.equal(got, want) and want.any()
    assert int(got.sum()) < int((st.keep & (st.prob > 0.01)).sum())  # the cap bites
    loss = masked_ce(h, w, y, shift=True, select=pol)
    torch.testing.assert_close(loss, masked_ce(h, w, y, shift=True, keep=st.keep & ~got))
    with pytest.raises(ValueError, match="kn_cap"):
        DynamicXTF(kn_cap=1.5)
    with pytest.raises(ValueError, match="kn_cap"):
        DynamicXTF(kn_threshold=None, entropy_min=0.1, kn_cap=0.1)


def test_num_items_in_batch_is_checked_by_the_one_num_items_check():
    """The patched models check num_items_in_batch with masked_ce's own check, under its name."""
    from xtf_kernels.integrations._patched_forward import _check_num_items

    y = torch.tensor([[1, 2, -100]])
    with pytest.raises(ValueError, match="num_items_in_batch: expected a whole number"):
        _check_num_items(1.5, y, None, True)
    with pytest.raises(TypeError, match="num_items_in_batch: expected an integer or float tensor"):
        _check_num_items(torch.tensor(True), y, None, True)
    with pytest.raises(ValueError, match="num_items_in_batch: expected >= 0"):
        _check_num_items(torch.tensor([-3]), y, None, True)
    assert _check_num_items(torch.tensor([4]), y, None, True).shape == ()
    assert _check_num_items(0, torch.full((1, 3), -100), None, True) is None
