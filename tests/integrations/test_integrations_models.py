"""apply_xtf on tiny random-init HF causal LMs: loss and every gradient equal the unpatched model's."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests._tiny import make_tiny_model  # noqa: E402
from xtf_kernels.integrations.transformers import (  # noqa: E402
    apply_xtf,
    get_patch,
    is_patched,
    revert,
)

V = 384


def _phi_with_bias() -> torch.nn.Module:
    """Phi: an LM head with a bias (PhiForCausalLM's lm_head has bias=True)."""
    cfg = transformers.PhiConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    assert m.get_output_embeddings().bias is not None
    with torch.no_grad():  # make the bias matter
        m.get_output_embeddings().bias.normal_(0, 0.5)
    return m


def _mixtral_moe() -> torch.nn.Module:
    """Mixtral with router logits on: the load-balancing loss is part of ``loss``."""
    cfg = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        output_router_logits=True, router_aux_loss_coef=0.1, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _model(arch: str) -> torch.nn.Module:
    if arch == "phi-bias":
        m = _phi_with_bias()
    elif arch == "mixtral-moe":
        m = _mixtral_moe()
    elif arch == "gemma2-softcap5":  # a softcap small enough to bend the logits
        m = make_tiny_model("gemma2", vocab_size=V, final_logit_softcapping=5.0)
    else:
        m = make_tiny_model(arch, vocab_size=V)
    m.config._attn_implementation = "eager"
    return m.float().train()


def _batch(seed: int = 0, B: int = 3, L: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt
    labels[1, -3:] = -100  # right padding
    att = torch.ones(B, L, dtype=torch.long)
    att[1, -3:] = 0
    keep = torch.rand(B, L, generator=g) > 0.35
    return ids, att, labels, keep


def _grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_same_grads(ref: torch.nn.Module, got: torch.nn.Module) -> None:
    gr, gg = _grads(ref), _grads(got)
    assert set(gr) == set(gg) and len(gr) == sum(p.requires_grad for p in ref.parameters())
    for n in gr:
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-4, atol=1e-6, msg=n)


ARCHS = ["llama", "qwen2", "mistral", "gemma2", "gemma2-softcap5", "phi-bias", "mixtral-moe"]


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_all_grads_match_unpatched(arch: str) -> None:
    ref = _model(arch)
    got = apply_xtf(copy.deepcopy(ref))
    ids, att, labels, keep = _batch()
    out_ref = ref(input_ids=ids, attention_mask=att, labels=labels)
    out_ref.loss.backward()
    out = got(input_ids=ids, attention_mask=att, labels=labels)
    out.loss.backward()
    assert out.logits is None  # no [tokens x vocab] logits unless asked
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(ref, got)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi-bias"])
def test_keep_mask_and_num_items_match_masked_labels(arch: str) -> None:
    """keep=False == label -100; num_items_in_batch divides the sum exactly as HF does."""
    ref = _model(arch)
    got = apply_xtf(copy.deepcopy(ref))
    ids, att, labels, keep = _batch(seed=1)
    num = torch.tensor(57)
    ref_labels = labels.masked_fill(~keep, -100)
    out_ref = ref(input_ids=ids, attention_mask=att, labels=ref_labels, num_items_in_batch=num)
    out_ref.loss.backward()
    out = got(input_ids=ids, attention_mask=att, labels=labels, xtf_keep=keep, num_items_in_batch=num)
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(ref, got)


def test_tied_weights_gradient_reaches_embedding() -> None:
    ref = make_tiny_model("llama", vocab_size=V, tie_word_embeddings=True).train()
    got = apply_xtf(copy.deepcopy(ref))
    assert got.get_output_embeddings().weight is got.get_input_embeddings().weight
    ids, att, labels, _ = _batch(seed=2)
    ref(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
    got(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
    _assert_same_grads(ref, got)


def test_logits_on_request_stats_and_return_dict() -> None:
    ref = _model("gemma2-softcap5")
    got = apply_xtf(copy.deepcopy(ref))
    ids, att, labels, keep = _batch(seed=3)
    with torch.no_grad():
        out_ref = ref(input_ids=ids, attention_mask=att, labels=labels)
        out = got(input_ids=ids, attention_mask=att, labels=labels, xtf_return_logits=True,
                  xtf_return_stats=True, xtf_keep=keep)
        tup = got(input_ids=ids, attention_mask=att, labels=labels, return_dict=False)
    torch.testing.assert_close(out.logits, out_ref.logits)  # softcapped logits, as the model's
    st = out.xtf_stats
    logp = torch.log_softmax(out_ref.logits.double(), -1)[:, :-1]
    gold = logp.gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    scored = labels[:, 1:] != -100
    torch.testing.assert_close(st.logprob[:, 1:][scored].double(), gold[scored], rtol=1e-5, atol=1e-5)
    assert torch.isnan(st.logprob[:, 0]).all()
    assert torch.equal(st.keep[:, 1:], (scored & keep[:, 1:]))
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out_ref.loss, rtol=1e-5, atol=1e-6)


def test_logits_to_keep_and_shift_labels() -> None:
    ref = _model("qwen2")
    got = apply_xtf(copy.deepcopy(ref))
    ids, att, labels, _ = _batch(seed=4)
    k = 5
    with torch.no_grad():
        out_ref = ref(input_ids=ids, labels=labels[:, -k:], logits_to_keep=k)
        window = got(input_ids=ids, labels=labels[:, -k:], logits_to_keep=k)
        full = got(input_ids=ids, labels=labels, logits_to_keep=k)  # sliced to the last k
        sref = ref(input_ids=ids, labels=labels)
        pre = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        shifted = got(input_ids=ids, labels=labels, shift_labels=pre)
    torch.testing.assert_close(window.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted.loss, sref.loss, rtol=1e-5, atol=1e-6)


def test_generation_unchanged_and_revert() -> None:
    m = _model("llama").eval()
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = m(input_ids=ids).logits
        gen_before = m.generate(ids, max_new_tokens=4, do_sample=False)
    apply_xtf(m)
    assert is_patched(m) and get_patch(m).keep_key == "xtf_keep"
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, before)
        assert torch.equal(m.generate(ids, max_new_tokens=4, do_sample=False), gen_before)
    revert(m)
    assert not is_patched(m) and "forward" not in m.__dict__
    with torch.no_grad():
        out = m(input_ids=ids, labels=ids)
    assert out.logits is not None  # the original forward again


def test_zero_num_items() -> None:
    m = apply_xtf(_model("llama"))
    ids, att, labels, keep = _batch(seed=6)
    none_kept = torch.zeros_like(keep)
    out = m(input_ids=ids, labels=labels, xtf_keep=none_kept, num_items_in_batch=torch.tensor(0))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    with pytest.raises(ValueError, match="num_items_in_batch: got 0 but this micro-batch has"):
        m(input_ids=ids, labels=labels, num_items_in_batch=0)


def test_bad_inputs() -> None:
    m = _model("llama")
    ids, att, labels, keep = _batch(seed=7)
    apply_xtf(m)
    with pytest.raises(ValueError, match="already patched"):
        apply_xtf(m)
    with pytest.raises(ValueError, match=r"xtf_keep: expected shape \(3, 11\)"):
        m(input_ids=ids, labels=labels, xtf_keep=keep[:, :-1])
    with pytest.raises(TypeError, match="xtf_keep: expected a bool"):
        m(input_ids=ids, labels=labels, xtf_keep=keep.float())
    with pytest.raises(ValueError, match="given without labels"):
        m(input_ids=ids, xtf_keep=keep)
    with pytest.raises(ValueError, match="labels: expected shape"):
        m(input_ids=ids, labels=labels[:, :-2])
    revert(m)
    with pytest.raises(ValueError, match="unpatched"):
        revert(m)
    no_head = _model("llama")
    no_head.lm_head = torch.nn.Identity()
    with pytest.raises(TypeError, match="nn.Linear LM head"):
        apply_xtf(no_head)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply_xtf("llama")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="get_output_embeddings"):
        apply_xtf(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="keep_key"):
        apply_xtf(_model("llama"), keep_key="not an identifier")


def test_apply_xtf_loss_options_reach_masked_ce() -> None:
    """``label_smoothing`` / ``z_loss`` given to apply_xtf are those of every masked_ce call."""
    from xtf_kernels import masked_ce

    ids, att, labels, keep = _batch(seed=8)
    m = apply_xtf(_model("llama"), label_smoothing=0.2, z_loss=1e-2)
    out = m(input_ids=ids, attention_mask=att, labels=labels)
    with torch.no_grad():
        hidden = revert(m).model(input_ids=ids, attention_mask=att).last_hidden_state
    want = masked_ce(hidden, m.lm_head.weight, labels, shift=True, label_smoothing=0.2, z_loss=1e-2)
    plain = masked_ce(hidden, m.lm_head.weight, labels, shift=True)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, plain)


@pytest.mark.parametrize("bad", [dict(z_loss=float("nan")), dict(z_loss=-1.0), dict(label_smoothing=1.0),
                                 dict(label_smoothing=True), dict(select=3), dict(backend="cuda")])
def test_apply_xtf_and_masked_ce_refuse_a_loss_option_alike(bad) -> None:
    """The loss options ``apply_xtf`` takes are checked by masked_ce's own check, at patch time:
    same error, same message (a NaN ``z_loss`` is refused by both, not accepted by one)."""
    from xtf_kernels import masked_ce

    with pytest.raises((TypeError, ValueError)) as direct:
        masked_ce(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), **bad)
    with pytest.raises(direct.type) as patched:
        apply_xtf(_model("llama"), **bad)
    assert str(patched.value) == str(direct.value)


def test_signature_carries_keep_key_and_peft_is_unwrapped() -> None:
    import inspect

    m = apply_xtf(_model("llama"), keep_key="my_keep")
    params = inspect.signature(m.forward).parameters
    assert "my_keep" in params and "labels" in params
    assert any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    peft = pytest.importorskip("peft")
    base = _model("llama")
    ref = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8, init_lora_weights=False)
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, cfg)
    torch.manual_seed(0)
    pref = peft.get_peft_model(ref, cfg)
    apply_xtf(pm)
    assert is_patched(pm.get_base_model())
    ids, att, labels, keep = _batch(seed=8)
    a = pm(input_ids=ids, attention_mask=att, labels=labels, xtf_keep=keep)
    b = pref(input_ids=ids, attention_mask=att, labels=labels.masked_fill(~keep, -100))
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(pref, pm)


def test_deepcopy_of_patched_model_is_independent() -> None:
    ref = _model("llama")
    a = apply_xtf(copy.deepcopy(ref))
    b = copy.deepcopy(a)
    assert is_patched(b) and get_patch(b) is not get_patch(a)
    ids, att, labels, keep = _batch(seed=9)
    b(input_ids=ids, attention_mask=att, labels=labels, xtf_keep=keep).loss.backward()
    assert all(p.grad is None for p in a.parameters())  # the copy ran its own weights
    ref(input_ids=ids, attention_mask=att, labels=labels.masked_fill(~keep, -100)).loss.backward()
    _assert_same_grads(ref, b)
    revert(b)
    assert is_patched(a) and not is_patched(b)


def test_keep_alias_and_unknown_keywords_refused() -> None:
    """``keep=`` (the column xtf export writes) is the keep mask; no keyword is dropped silently."""
    m = apply_xtf(_model("llama"))
    ids, att, labels, keep = _batch(seed=10)
    want = m(input_ids=ids, attention_mask=att, labels=labels, xtf_keep=keep).loss
    unmasked = m(input_ids=ids, attention_mask=att, labels=labels).loss
    got = m(input_ids=ids, attention_mask=att, labels=labels, keep=keep).loss
    assert abs(want.item() - unmasked.item()) > 1e-3  # the mask matters on this batch
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = torch.randn(ids.shape)
    torch.testing.assert_close(
        m(input_ids=ids, labels=labels, ref_logprobs=ref, xtf_return_stats=True).xtf_stats.logprob_delta,
        m(input_ids=ids, labels=labels, xtf_ref_logprobs=ref, xtf_return_stats=True).xtf_stats.logprob_delta,
        equal_nan=True,
    )
    with pytest.raises(ValueError, match="'xtf_keep' and 'keep' both given"):
        m(input_ids=ids, labels=labels, keep=keep, xtf_keep=keep)
    with pytest.raises(ValueError, match=r"keep: expected shape \(3, 11\)"):
        m(input_ids=ids, labels=labels, keep=keep[:, 1:])
    with pytest.raises(ValueError, match="keep given without labels"):
        m(input_ids=ids, keep=keep)
    for bad in ("keep_mask", "loss_mask", "kep"):  # transformers would ignore each of them
        with pytest.raises(TypeError, match=f"unexpected keyword argument.*'{bad}'.*'xtf_keep' / 'keep'"):
            m(input_ids=ids, labels=labels, **{bad: keep})
    # real model keywords still pass: TransformersKwargs keys, decorator keywords, parameters
    out = m(input_ids=ids, attention_mask=att, labels=labels, keep=keep, use_cache=False,
            output_hidden_states=True, past_key_values=None, num_items_in_batch=7)
    assert out.hidden_states is not None and out.loss.item() > 0
    assert isinstance(m(input_ids=ids, labels=labels, keep=keep, return_dict=False), tuple)
    # a tokenizer's token_type_ids (Llama has none) and a None drop nothing: accepted
    torch.testing.assert_close(
        m(input_ids=ids, attention_mask=att, labels=labels, keep=keep, token_type_ids=torch.zeros_like(ids),
          some_option=None).loss, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep_key: 'ref_logprobs' is the name of another XTF field"):
        apply_xtf(_model("llama"), keep_key="ref_logprobs")


def test_untyped_kwargs_model_refuses_mask_like_names() -> None:
    """A forward with untyped ``**kwargs`` (GPT-2): unknown set, so only mask-like names are refused."""
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    m = apply_xtf(transformers.GPT2LMHeadModel(cfg).float().eval())  # no dropout
    assert get_patch(m).accepted is None
    ids, att, labels, keep = _batch(seed=11)
    a = m(input_ids=ids, labels=labels, keep=keep).loss
    b = m(input_ids=ids, labels=labels.masked_fill(~keep, -100)).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'completion_mask'"):
        m(input_ids=ids, labels=labels, completion_mask=keep)
    assert m(input_ids=ids, labels=labels, some_model_option=1).loss.item() > 0
