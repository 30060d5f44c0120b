"""HF Trainer / TRL SFTTrainer with apply_xtf: same losses as without it, GA 1 and 4."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from tests._tiny import make_tiny_model, make_tokenizer  # noqa: E402
from xtf_kernels.integrations.collator import XTFCollator  # noqa: E402
from xtf_kernels.integrations.transformers import XTFTrainerMixin, apply_xtf  # noqa: E402
from xtf_kernels.xtf.dynamic import DynamicXTF  # noqa: E402

MAX_STEPS = 3


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def records(tok):
    """xtf-export-like records: ragged lengths, a prompt (-100), a keep mask with ~30% masked."""
    g = torch.Generator().manual_seed(0)
    recs = []
    for _ in range(24):
        n = int(torch.randint(6, 15, (1,), generator=g))
        ids = torch.randint(3, len(tok), (n,), generator=g).tolist()
        p = int(torch.randint(1, 4, (1,), generator=g))
        labels = [-100] * p + ids[p:]
        keep = (torch.rand(n, generator=g) > 0.3).tolist()
        recs.append({"input_ids": ids, "labels": labels, "keep": keep})
    return recs


def _args(cls, tmp_path, ga: int, **extra):
    return cls(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
        gradient_accumulation_steps=ga, max_steps=MAX_STEPS, learning_rate=1e-2, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, seed=0, data_seed=0, bf16=False,
        **extra,
    )


def _losses(trainer) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    out = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(out) == MAX_STEPS
    return out


def _model(tok, patch: bool = False):
    torch.manual_seed(0)
    m = make_tiny_model("llama", vocab_size=len(tok)).train()
    return apply_xtf(m) if patch else m


@pytest.mark.parametrize("ga", [1, 4])
def test_hf_trainer_same_losses_with_and_without_patch(tmp_path, tok, records, ga: int) -> None:
    ds = datasets.Dataset.from_list(records)
    masked = XTFCollator(tok.pad_token_id, apply_keep_to_labels=True)  # keep folded into labels
    # the plain Trainer would drop the "keep" column before the collator folds it into labels
    args = _args(transformers.TrainingArguments, tmp_path, ga, remove_unused_columns=False)
    base = _losses(transformers.Trainer(model=_model(tok), args=args, train_dataset=ds, data_collator=masked))
    patched = _losses(
        transformers.Trainer(model=_model(tok, patch=True), args=args, train_dataset=ds, data_collator=masked)
    )
    torch.testing.assert_close(patched, base, rtol=2e-5, atol=2e-5)
    # the keep mask carried through the batch (labels untouched) gives the same run; the
    # column survives remove_unused_columns because the patched forward's signature names it
    from xtf_kernels.integrations.transformers import XTFTrainer

    carried = XTFCollator(tok.pad_token_id)
    args = _args(transformers.TrainingArguments, tmp_path, ga)  # remove_unused_columns=True
    xtf = _losses(XTFTrainer(model=_model(tok), args=args, train_dataset=ds, data_collator=carried))
    torch.testing.assert_close(xtf, base, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("ga", [1, 4])
def test_trl_sft_trainer_same_losses(tmp_path, tok, records, ga: int) -> None:
    trl = pytest.importorskip("trl")
    from xtf_kernels.integrations.trl import XTFSFTTrainer

    ds = datasets.Dataset.from_list(records)
    args = _args(trl.SFTConfig, tmp_path, ga, remove_unused_columns=False,
                 dataset_kwargs={"skip_prepare_dataset": True})
    base_tr = trl.SFTTrainer(model=_model(tok), args=args, train_dataset=ds, processing_class=tok,
                             data_collator=XTFCollator(tok.pad_token_id, apply_keep_to_labels=True))
    base = _losses(base_tr)
    xtf_tr = XTFSFTTrainer(model=_model(tok), args=args, train_dataset=ds, processing_class=tok,
                           data_collator=XTFCollator(tok.pad_token_id))
    xtf = _losses(xtf_tr)
    torch.testing.assert_close(xtf, base, rtol=2e-5, atol=2e-5)
    logged = [h for h in xtf_tr.state.log_history if "loss" in h]
    assert all(0.3 < h["xtf/kept_fraction"] < 0.95 for h in logged)
    ref_ent = [h["entropy"] for h in base_tr.state.log_history if "loss" in h]
    # TRL averages entropy over label tokens, we over scored tokens (kept or masked): close
    assert all(abs(a["entropy"] - b) < 0.05 for a, b in zip(logged, ref_ent))


def test_dynamic_policy_logs_per_rule_fractions(tmp_path, tok, records) -> None:
    ds = datasets.Dataset.from_list(records)
    from xtf_kernels.integrations.transformers import XTFTrainer

    # thresholds at the initial model's median entropy / gold prob: both rules fire on part
    probe = _model(tok, patch=True)
    with torch.no_grad():
        st = probe(**XTFCollator(tok.pad_token_id)(records), xtf_return_stats=True).xtf_stats
    ent_med = float(st.entropy[st.keep].median())
    prob_med = float(st.prob[st.keep].median())
    policy = DynamicXTF(kn_threshold=1.0 - prob_med, entropy_min=ent_med)
    tr = XTFTrainer(model=_model(tok), args=_args(transformers.TrainingArguments, tmp_path, 2),
                    train_dataset=ds, data_collator=XTFCollator(tok.pad_token_id), xtf_select=policy)
    _losses(tr)
    n_calls = policy.calls
    assert n_calls == 2 * MAX_STEPS  # one call per micro-batch
    metrics = tr.evaluate(datasets.Dataset.from_list(records[:6]))  # masks apply, not recorded
    assert metrics["eval_loss"] == metrics["eval_loss"] and policy.calls > n_calls
    assert policy.step_summary() == {f"xtf/masked_{k}": 0.0 for k in ("kn", "entropy", "any")}
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(policy.history) == MAX_STEPS  # one record per optimizer step (2 micro-batches)
    for h, rec in zip(logs, policy.history):
        assert h["xtf/masked_kn"] == pytest.approx(rec["kn"])
        assert h["xtf/masked_entropy"] == pytest.approx(rec["entropy"])
        assert h["xtf/masked_any"] == pytest.approx(rec["any"])
        assert 0.0 < rec["entropy"] < 1.0 and 0.0 < rec["kn"] < 1.0
        assert max(rec["kn"], rec["entropy"]) <= rec["any"] < 1.0


def test_mixin_counts_only_kept_tokens(tmp_path, tok, records) -> None:
    from xtf_kernels.integrations.transformers import XTFTrainer

    coll = XTFCollator(tok.pad_token_id)
    batches = [coll(records[0:2]), coll(records[2:4])]
    tr = XTFTrainer(model=_model(tok), args=_args(transformers.TrainingArguments, tmp_path, 2))
    n = tr._get_num_items_in_batch(batches, torch.device("cpu"))
    want = sum(((b["labels"] != -100) & b["xtf_keep"])[:, 1:].sum() for b in batches)
    assert int(n) == int(want)
    assert isinstance(tr, XTFTrainerMixin)


def test_accelerate_gradient_accumulation_with_global_divisor(tok, records) -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    from xtf_kernels.integrations.distributed import global_num_items

    coll = XTFCollator(tok.pad_token_id)
    micro = [coll(records[0:3]), coll(records[3:5])]
    n = global_num_items(micro)
    ref = _model(tok, patch=True)
    for b in micro:
        ref(**b, num_items_in_batch=n).loss.backward()
    try:
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=len(micro))
        model = _model(tok, patch=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model, opt = acc.prepare(model, opt)
        for b in micro:
            with acc.accumulate(model):
                loss = model(**b, num_items_in_batch=n).loss
                acc.backward(loss * acc.gradient_accumulation_steps)
        got = {k: p.grad for k, p in acc.unwrap_model(model).named_parameters()}
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-7, msg=k)



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real ``xtf score`` + ``xtf export`` run on a tiny Llama: (model dir, jsonl path, export info)."""
    from tests._tiny import SAMPLE_TEXTS, make_tiny_model_dir
    from xtf_kernels.xtf import export_dataset, score_dataset

    tmp = tmp_path_factory.mktemp("xtf_export")
    model_dir = make_tiny_model_dir(tmp)
    data = [{"prompt": f"Q{i}: " + t[:18], "response": t} for i, t in enumerate(SAMPLE_TEXTS[:8])]
    score_dataset(model_dir, data, tmp / "run", progress=False, preset="paper")  # masks a large share
    info = export_dataset(tmp / "run", tmp / "train_xtf.jsonl")
    assert info["examples"] == 8 and 0.2 < info["trained"] / info["response"] < 0.95  # XTF masked part
    return model_dir, tmp / "train_xtf.jsonl", info


def _sft_on_export(trl, exported, tmp_path, collator=None, **config):
    """XTFSFTTrainer on the exported file; one micro-batch = the whole export, 2 steps."""
    from xtf_kernels.integrations.trl import XTFSFTTrainer

    model_dir, path, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    train = datasets.Dataset.from_json(str(path), cache_dir=str(tmp_path / "cache"))
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2,
                         learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                         seed=0, data_seed=0, dataset_kwargs={"skip_prepare_dataset": True}, **config)
    tr = XTFSFTTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                       train_dataset=train, processing_class=tok,
                       data_collator=collator(tok.pad_token_id) if collator else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert len(logged) == 2
    return logged


def test_trl_kept_fraction_on_xtf_export_output(tmp_path, exported) -> None:
    """``xtf export`` writes -100 into labels on masked tokens; the metric still sees them.

    ``xtf/kept_fraction`` = trained / response tokens; before the ``response`` column it was
    trained / labelled tokens, 1.0 on every exported dataset.
    """
    trl = pytest.importorskip("trl")
    info = exported[2]
    logged = _sft_on_export(trl, exported, tmp_path, XTFCollator, remove_unused_columns=False)
    for h in logged:
        assert h["xtf/kept_fraction"] == pytest.approx(info["trained"] / info["response"], abs=1e-6)


def test_trl_padding_free_recipe_on_xtf_export_output(tmp_path, exported) -> None:
    """The README / docs/training.md padding-free recipe for exported data, exactly.

    TRL 1.16 refuses a custom collator with ``SFTConfig(padding_free=True)``: the collator
    packs instead (``XTFCollator(packing=True)``, TRL's ``padding_free`` left False). Same
    run as padded batches; TRL's own padding-free collator (``max_length=None``, no
    collator) gives it too, from export's masked labels, and logs no kept fraction.
    """
    trl = pytest.importorskip("trl")
    from functools import partial

    info = exported[2]
    packed = _sft_on_export(trl, exported, tmp_path, partial(XTFCollator, packing=True),
                            remove_unused_columns=False)
    padded = _sft_on_export(trl, exported, tmp_path, XTFCollator, remove_unused_columns=False)
    trl_own = _sft_on_export(trl, exported, tmp_path, padding_free=True, max_length=None)
    torch.testing.assert_close([h["loss"] for h in packed], [h["loss"] for h in padded], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close([h["loss"] for h in trl_own], [h["loss"] for h in padded], rtol=2e-5, atol=2e-5)
    assert all(h["xtf/kept_fraction"] == pytest.approx(info["trained"] / info["response"]) for h in packed)
    assert all("xtf/kept_fraction" not in h for h in trl_own)
