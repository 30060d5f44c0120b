"""attention_received vs explicit softmax probabilities, and the HF collector vs eager attention."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests._tiny import eager_attentions, make_tiny_model
from xtf_kernels.attention import (
    ATTN_IMPLEMENTATION,
    ReceivedAttentionCollector,
    attention_received,
    collect_received_attention,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
ATTN_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
#: where the Triton kernels run: a CUDA device when there is one, else the CPU interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def received(q, k, *, backend, attention_mask=None, **kw):
    """attention_received on the device ``backend`` runs on; the result comes back on the CPU."""
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    mv = lambda t: None if t is None else t.to(dev)
    return attention_received(mv(q), mv(k), attention_mask=mv(attention_mask), backend=backend, **kw).cpu()


def visibility(L: int, valid: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """Bool [B, L(query), L(key)] by the documented rule, written independently of the kernels."""
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    if causal:
        ok = j <= i
        if window is not None:
            ok = ok & (i - j < window)
    else:
        ok = torch.ones(L, L, dtype=torch.bool)
        if window is not None:
            ok = (i - j).abs() <= window
    return ok[None] & valid[:, :, None] & valid[:, None, :]


def reference(q, k, *, scale=None, mask=None, causal=True, window=None, softcap=None, reduce="mean_over_queries"):
    """Full [B, H, L, L] float64 softmax probabilities, then the column sums."""
    q, k = q.double(), k.double()
    B, Hq, L, D = q.shape
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else D**-0.5)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    valid = torch.ones(B, L, dtype=torch.bool) if mask is None else mask.bool()
    ok = visibility(L, valid, causal, window)
    p = torch.softmax(s.masked_fill(~ok[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    r = p.sum(dim=2)
    if reduce == "mean_over_queries":
        r = r / ok.sum(dim=1).clamp_min(1)[:, None]
    return r.float()


def _inputs(B, Hq, Hkv, L, D, pad, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, L, D, generator=g) * 1.5).to(dtype)
    k = (torch.randn(B, Hkv, L, D, generator=g) * 1.5).to(dtype)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad and L > 8:
        mask[0, : L // 4] = 0  # left padding
        if B > 1:
            mask[1, L - L // 3 :] = 0  # right padding
    return q, k, mask


CASES = [
    # B, Hq, Hkv, L, D, causal, window, softcap, scale
    (2, 4, 2, 37, 8, True, None, None, None),  # GQA, L not a multiple of the tile
    (2, 4, 2, 37, 8, True, 5, None, None),  # sliding window
    (2, 6, 3, 45, 20, True, 7, 3.0, 0.3),  # window + softcap + explicit scale, odd head dim
    (2, 4, 4, 33, 16, False, None, None, None),  # bidirectional
    (2, 4, 1, 33, 16, False, 4, 2.0, None),  # bidirectional window, MQA
    (1, 2, 1, 1, 16, True, None, None, None),  # L = 1
    (1, 2, 2, 16, 32, True, 16, None, None),  # exactly one tile, window = L
]


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hkv{}L{}D{}c{}w{}cap{}s{}".format(*c))
def test_matches_explicit_probabilities(backend, case):
    B, Hq, Hkv, L, D, causal, window, softcap, scale = case
    q, k, mask = _inputs(B, Hq, Hkv, L, D, pad=True)
    for reduce in ("mean_over_queries", "sum"):
        want = reference(q, k, scale=scale, mask=mask, causal=causal, window=window, softcap=softcap, reduce=reduce)
        for block in (16, None):
            got = received(
                q, k, scale=scale, attention_mask=mask, causal=causal, sliding_window=window,
                softcap=softcap, reduce=reduce, backend=backend, block=block,
            )
            assert got.dtype == torch.float32 and got.shape == (B, Hq, L)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_padding_zero_and_mass_conservation(backend):
    q, k, mask = _inputs(2, 4, 2, 40, 16, pad=True, seed=1)
    summed = received(q, k, attention_mask=mask.bool(), reduce="sum", backend=backend, block=16)
    # padding keys receive exactly 0 (not NaN)
    assert torch.all(summed[~mask.bool()[:, None, :].expand_as(summed)] == 0)
    # every real query distributes probability 1 over the keys it sees
    n_real = mask.sum(1).float()[:, None].expand(2, 4)
    torch.testing.assert_close(summed.sum(-1), n_real, rtol=1e-5, atol=1e-4)
    mean = received(q, k, attention_mask=mask, backend=backend, block=16)
    real = mask.bool()[:, None, :].expand_as(mean)
    assert torch.all(mean[real] > 0) and torch.all(mean[real] <= 1 + 1e-6)
    # causal: the first real query sees only the first real key, which so receives >= 1
    first = mask.argmax(dim=1)
    for b in range(2):
        assert torch.all(summed[b, :, first[b]] >= 1 - 1e-6)


def test_no_mask_equals_all_ones_and_torch_equals_triton():
    q, k, _ = _inputs(1, 4, 2, 29, 16, pad=False, seed=2)
    a = received(q, k, backend="torch")
    b = received(q, k, attention_mask=torch.ones(1, 29, dtype=torch.bool), backend="torch")
    torch.testing.assert_close(a, b)
    if HAS_TRITON:
        c = received(q, k, backend="triton", block=16)
        torch.testing.assert_close(a, c, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, backend):
    q, k, mask = _inputs(2, 4, 2, 33, 16, pad=True, seed=3, dtype=dtype)
    want = reference(q, k, mask=mask, window=6)
    got = received(q, k, attention_mask=mask, sliding_window=6, backend=backend, block=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_views_with_strides_and_no_grad():
    # HF passes transposed views [B, H, L, Dh]; gradients are never tracked
    x = torch.randn(2, 19, 4, 16, requires_grad=True)
    q = x.transpose(1, 2)
    k = torch.randn(2, 19, 2, 16).transpose(1, 2)
    got = attention_received(q, k, backend="torch", block=16)
    assert not got.requires_grad
    torch.testing.assert_close(got, reference(q.detach(), k))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(q=torch.randn(2, 4, 8)), ValueError, "q:"),
        (dict(q=torch.randn(1, 4, 8, 16).long()), TypeError, "q:"),
        (dict(k=torch.randn(1, 3, 8, 16)), ValueError, "k:"),
        (dict(k=torch.randn(1, 2, 9, 16)), ValueError, "k:"),
        (dict(k=torch.randn(1, 2, 8, 16).double()), TypeError, "k:"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale="x"), TypeError, "scale"),
        (dict(attention_mask=torch.ones(1, 7, dtype=torch.bool)), ValueError, "attention_mask"),
        (dict(attention_mask=torch.ones(1, 8)), TypeError, "attention_mask"),
        (dict(attention_mask=torch.full((1, 8), 2)), ValueError, "attention_mask"),
        (dict(causal=1), TypeError, "causal"),
        (dict(sliding_window=0), ValueError, "sliding_window"),
        (dict(sliding_window=2.5), TypeError, "sliding_window"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(reduce="max"), ValueError, "reduce"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(block=24), ValueError, "block"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, exc, words):
    args = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 8, 16))
    args.update(kwargs)
    q, k = args.pop("q"), args.pop("k")
    with pytest.raises(exc, match=words):
        attention_received(q, k, **args)


# ---------------------------------------------------------------------------------------------
# Hugging Face models: the collector vs eager attention probabilities (output_attentions=True)

#: sliding window per layer of the tiny configs in tests/_tiny.py (written out, not read from
#: the modules, so a wrong read of the module's window fails the test)
WINDOWS = {
    "llama": [None, None],
    "qwen2": [None, None],
    "mistral": [8, 8],
    "gemma2": [8, None],  # Gemma 2 alternates sliding/global layers; softcapping 50
    "qwen2-window": [None, 6],  # Qwen2 with a sliding window on its upper layers only
}
ARCH_OVERRIDES = {
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
}


def _batch(L=21, B=3, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    return ids.masked_fill(mask == 0, 0), mask


def eager_received(model, arch, ids, mask, *, layers=None, reduce="mean_over_queries"):
    out = eager_attentions(model, ids, mask)
    B, L = ids.shape
    n = len(out.attentions)
    sel = range(n) if layers is None else [li % n for li in layers]
    per_layer = []
    for li in sel:
        probs = out.attentions[li].double()  # [B, H, L, L]
        ok = visibility(L, mask.bool(), True, WINDOWS[arch][li])
        r = (probs * ok[:, None]).sum(dim=2)
        if reduce == "mean_over_queries":
            r = r / ok.sum(dim=1).clamp_min(1)[:, None]
        per_layer.append(r.mean(dim=1))
    return torch.stack(per_layer).mean(0).float()


def make_tiny_models() -> dict:
    """One tiny random model per entry of :data:`WINDOWS` (shared with test_attention_documents)."""
    out = {}
    for name in WINDOWS:
        arch, over = ARCH_OVERRIDES.get(name, (name, {}))
        out[name] = make_tiny_model(arch, vocab_size=100, **over)
    return out


@pytest.fixture(scope="module")
def tiny_models():
    return make_tiny_models()


@pytest.mark.parametrize("arch", list(WINDOWS))
def test_collector_matches_eager_attention(tiny_models, arch):
    model = tiny_models[arch]
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA
    ids, mask = _batch()
    before = model.config._attn_implementation
    for reduce in ("mean_over_queries", "sum"):
        got = collect_received_attention(model, ids, mask, reduce=reduce)
        want = eager_received(model, arch, ids, mask, reduce=reduce)
        assert got.shape == ids.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.all(got[mask == 0] == 0)
    for layers in ([0], [-1]):
        got = collect_received_attention(model, ids, mask, layers=layers)
        torch.testing.assert_close(got, eager_received(model, arch, ids, mask, layers=layers), atol=1e-6, rtol=1e-5)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("arch", list(WINDOWS))
def test_collector_leaves_outputs_unchanged(tiny_models, arch):
    model = tiny_models[arch]
    ids, mask = _batch(seed=1)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        col = ReceivedAttentionCollector(mask)
        with col.attach(model):
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            ours = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], base[real], atol=1e-5, rtol=1e-5)
    assert col.layers_seen == [0, 1]
    assert col.result().shape == ids.shape


def test_collector_restores_implementation_on_error(tiny_models):
    model = tiny_models["llama"]
    before = model.config._attn_implementation
    ids, mask = _batch()
    col = ReceivedAttentionCollector(mask[:2])  # wrong batch: the layer call raises
    with pytest.raises(ValueError, match="attention_mask"), torch.no_grad(), col.attach(model):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert model.config._attn_implementation == before
    # a model that is not attached is left alone by the registered function's collector
    with pytest.raises(RuntimeError, match="no attention layer"):
        ReceivedAttentionCollector(mask).result()


def test_collector_bad_inputs(tiny_models):
    model = tiny_models["qwen2"]
    ids, mask = _batch()
    with pytest.raises(ValueError, match="attention_mask"):
        collect_received_attention(model, ids, mask[:, :-1])
    with pytest.raises(TypeError, match="input_ids"):
        collect_received_attention(model, ids.float(), mask)
    with pytest.raises(ValueError, match="input_ids"):
        collect_received_attention(model, ids[0], mask[0])
    with pytest.raises(ValueError, match="layers"):
        collect_received_attention(model, ids, mask, layers=[5])
    with pytest.raises(TypeError, match="layers"):
        collect_received_attention(model, ids, mask, layers=["0"])
    with pytest.raises(ValueError, match="reduce"):
        collect_received_attention(model, ids, mask, reduce="max")
    with pytest.raises(TypeError, match="model"):
        collect_received_attention(torch.nn.Linear(2, 2), ids, mask)
    with pytest.raises(TypeError, match="attention_mask"):
        ReceivedAttentionCollector(mask.float())


def test_no_padding_and_training_mode_restored(tiny_models):
    model = tiny_models["mistral"]
    ids, _ = _batch(L=19, B=2, seed=3)
    model.train()
    try:
        got = collect_received_attention(model, ids, None)
        assert model.training
    finally:
        model.eval()
    want = eager_received(model, "mistral", ids, torch.ones_like(ids))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_triton_memory_is_linear_in_length():
    B, H, Hkv, L, D = 1, 8, 2, 8192, 64
    q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = attention_received(q, k)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * B * H * L  # a few fp32 [B, H, L] buffers, far below B*H*L*L*4
    qs, ks = q[..., :1024, :], k[..., :1024, :]
    torch.testing.assert_close(
        attention_received(qs, ks, backend="triton"), reference(qs.cpu(), ks.cpu()).cuda(), atol=2e-3, rtol=2e-2
    )
    assert r.shape == (B, H, L)
