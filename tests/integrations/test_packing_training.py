"""Training on packed (padding-free) batches with apply_xtf.

References: the unpatched Hugging Face model on the same packed batch, and each document run
alone (transformers' masks make SDPA / eager attention block-diagonal from packed
``position_ids``). Collators: transformers' ``DataCollatorWithFlattening``, TRL's
``padding_free=True`` collator and ``XTFCollator(packing=True)``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from tests._tiny import make_tiny_model, make_tokenizer  # noqa: E402
from xtf_kernels.integrations.collator import XTFCollator  # noqa: E402
from xtf_kernels.integrations.distributed import count_kept_tokens  # noqa: E402
from xtf_kernels.integrations.transformers import apply_xtf  # noqa: E402

V = 384
LENGTHS = (7, 1, 12, 4, 9)


def _records(seed: int = 0, keep: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        p = min(n - 1, 2)
        rec = {"input_ids": ids, "labels": [-100] * p + ids[p:]}
        if keep:
            rec["keep"] = (torch.rand(n, generator=g) > 0.3).tolist()
        out.append(rec)
    return out


def _model(attn: str = "sdpa", patch: bool = False, arch: str = "llama") -> torch.nn.Module:
    m = make_tiny_model(arch, vocab_size=V, seed=0)
    m.set_attn_implementation(attn)
    m = m.float().train()
    return apply_xtf(m) if patch else m


def _grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict, tol: float = 2e-5) -> None:
    assert set(a) == set(b) and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def _per_document(records: list[dict], num_items: int, keep: bool) -> tuple[torch.Tensor, dict]:
    """Each record alone through the patched model, losses summed over ``num_items``."""
    m = _model(patch=True)
    total = 0.0
    for r in records:
        batch = XTFCollator(0)([r])
        if not keep:
            batch.pop("xtf_keep", None)
        loss = m(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()
    return total, _grads(m)


def _step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    # use_cache=False as the Trainer sets it: with a KV cache transformers does not look for
    # packed position_ids and lets the documents attend to each other
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), _grads(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_data_collator_with_flattening(attn, flash_kwargs):
    records = [{k: r[k] for k in ("input_ids", "labels")} for r in _records()]
    coll = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = coll(records)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    if flash_kwargs:
        assert "cu_seq_lens_q" in batch and "max_length_k" in batch
    base_loss, base_grads = _step(_model(attn), batch)
    loss, grads = _step(_model(attn, patch=True), batch)
    torch.testing.assert_close(loss, base_loss, rtol=2e-5, atol=2e-5)
    _assert_same(grads, base_grads)
    n = int(count_kept_tokens(batch["labels"], position_ids=batch["position_ids"]))
    doc_loss, doc_grads = _per_document(records, n, keep=False)
    torch.testing.assert_close(loss, doc_loss, rtol=2e-5, atol=2e-5)
    _assert_same(grads, doc_grads)


def test_labels_not_masked_at_document_starts():
    """A collator that leaves real labels at the documents' first tokens: apply_xtf still
    trains no cross-document prediction (the unpatched model does)."""
    records = [{k: r[k] for k in ("input_ids", "labels")} for r in _records()]
    batch = transformers.DataCollatorWithFlattening()(records)
    batch["labels"] = batch["input_ids"].clone()  # every label real, document starts included
    loss, grads = _step(_model(patch=True), batch)
    plain = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in records]
    n = int(count_kept_tokens(batch["labels"], position_ids=batch["position_ids"]))
    doc_loss, doc_grads = _per_document(plain, n, keep=False)
    torch.testing.assert_close(loss, doc_loss, rtol=2e-5, atol=2e-5)
    _assert_same(grads, doc_grads)
    base_loss, _ = _step(_model(), batch)
    assert abs(float(base_loss) - float(loss)) > 1e-4


def test_documents_from_cu_seq_lens_only():
    """No position_ids in the batch: the document starts come from ``cu_seq_lens_q``."""
    records = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in _records()]
    batch = transformers.DataCollatorWithFlattening(return_position_ids=False, return_flash_attn_kwargs=True)(records)
    batch["labels"] = batch["input_ids"].clone()  # real labels at the document starts
    m = _model(patch=True)
    out = m(**batch, use_cache=False, xtf_return_stats=True)
    starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0)[:-1].tolist()])
    assert torch.isnan(out.xtf_stats.lse[0, starts]).all()
    assert int(out.xtf_stats.keep.sum()) == sum(n - 1 for n in LENGTHS)


def test_xtf_collator_packing_keeps_masks_aligned():
    records = _records()
    packed = XTFCollator(0, packing=True, return_flash_attn_kwargs=True)(records)
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    assert packed["cu_seq_lens_q"].tolist() == [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    assert packed["max_length_q"] == max(LENGTHS)
    flat_keep = [k for r in records for k in r["keep"]]
    assert packed["xtf_keep"][0].tolist() == flat_keep
    loss, grads = _step(_model(patch=True), packed)
    n = sum(int(count_kept_tokens(torch.tensor([r["labels"]]), torch.tensor([r["keep"]]))) for r in records)
    doc_loss, doc_grads = _per_document(records, n, keep=True)
    torch.testing.assert_close(loss, doc_loss, rtol=2e-5, atol=2e-5)
    _assert_same(grads, doc_grads)
    # the padded batch of the same records gives the same loss and gradients
    pad_loss, pad_grads = _step(_model(patch=True), XTFCollator(0)(records))
    torch.testing.assert_close(loss, pad_loss, rtol=2e-5, atol=2e-5)
    _assert_same(grads, pad_grads)


def test_xtf_collator_packing_options():
    records = _records()
    out = XTFCollator(0, packing=True, pad_to_multiple_of=8, apply_keep_to_labels=True)(records)
    T = sum(LENGTHS)
    pad = -T % 8
    assert out["input_ids"].shape == (1, T + pad) and "xtf_keep" not in out
    assert (out["labels"][0, T:] == -100).all() and (out["position_ids"][0, T:] == 0).all()
    flat_keep = torch.tensor([k for r in records for k in r["keep"]])
    assert (out["labels"][0, :T][~flat_keep] == -100).all()
    with pytest.raises(ValueError, match="return_flash_attn_kwargs"):
        XTFCollator(0, return_flash_attn_kwargs=True)
    with pytest.raises(TypeError, match="packing"):
        XTFCollator(0, packing="yes")


def _trainer_losses(trainer) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _targs(cls, tmp_path, **extra):
    return cls(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, gradient_accumulation_steps=2,
               max_steps=2, learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no",
               use_cpu=True, seed=0, data_seed=0, bf16=False, **extra)


def _train_records(n: int = 12) -> list[dict]:
    recs = []
    for s in range(n // len(LENGTHS) + 1):
        recs += _records(seed=s + 1)
    return recs[:n]


def test_xtf_trainer_packed_equals_padded(tmp_path):
    from xtf_kernels.integrations.transformers import XTFTrainer

    ds = datasets.Dataset.from_list(_train_records())
    runs = []
    for packing in (False, True):
        tr = XTFTrainer(model=_model(), args=_targs(transformers.TrainingArguments, tmp_path),
                        train_dataset=ds, data_collator=XTFCollator(0, packing=packing))
        runs.append(_trainer_losses(tr))
    assert len(runs[0]) == 2
    torch.testing.assert_close(runs[1], runs[0], rtol=2e-5, atol=2e-5)


def test_mixin_count_skips_document_starts(tmp_path):
    from xtf_kernels.integrations.transformers import XTFTrainer

    records = _records()
    packed = XTFCollator(0, packing=True)(records)
    packed["labels"] = packed["input_ids"].clone()  # real labels at the document starts
    tr = XTFTrainer(model=_model(), args=_targs(transformers.TrainingArguments, tmp_path))
    n = tr._get_num_items_in_batch([packed], torch.device("cpu"))
    assert int(n) == int(packed["xtf_keep"].sum() - sum(r["keep"][0] for r in records))


def test_trl_padding_free(tmp_path):
    trl = pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from xtf_kernels.integrations.trl import XTFSFTTrainer

    records = [{k: r[k] for k in ("input_ids", "labels")} for r in _records()]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(records)
    assert "cu_seq_lens_q" in batch and "attention_mask" not in batch
    base_loss, base_grads = _step(_model(), batch)
    loss, grads = _step(_model(patch=True), batch)
    torch.testing.assert_close(loss, base_loss, rtol=2e-5, atol=2e-5)
    _assert_same(grads, base_grads)
    n = int(count_kept_tokens(batch["labels"], position_ids=batch["position_ids"]))
    doc_loss, doc_grads = _per_document(records, n, keep=False)
    torch.testing.assert_close(loss, doc_loss, rtol=2e-5, atol=2e-5)
    _assert_same(grads, doc_grads)

    # the trainers: SFTTrainer (TRL's fused head) and XTFSFTTrainer give the same run
    tok = make_tokenizer()
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("input_ids", "labels")} for r in _train_records()])
    args = _targs(trl.SFTConfig, tmp_path, padding_free=True, max_length=None,
                  dataset_kwargs={"skip_prepare_dataset": True})
    base_tr = trl.SFTTrainer(model=_model(), args=args, train_dataset=ds, processing_class=tok)
    base = _trainer_losses(base_tr)
    xtf_tr = XTFSFTTrainer(model=_model(), args=args, train_dataset=ds, processing_class=tok)
    ours = _trainer_losses(xtf_tr)
    assert len(base) == 2
    torch.testing.assert_close(ours, base, rtol=2e-5, atol=2e-5)
    tokens = [[h["num_tokens"] for h in t.state.log_history if "loss" in h] for t in (base_tr, xtf_tr)]
    assert tokens[0] == tokens[1] and tokens[1][-1] > 0  # counted from position_ids, as TRL does
