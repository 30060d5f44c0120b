"""Attention received with document boundaries (packed rows) vs per-document references.

Every reference here splits the packed row into its documents and runs plain (unpacked)
attention on each document separately: explicit float64 softmax probabilities for the
kernels, eager ``output_attentions=True`` for Hugging Face models.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.xtf.test_attention_received import WINDOWS, eager_received, make_tiny_models, reference
from xtf_kernels.attention import (
    ReceivedAttentionCollector,
    attention_received,
    attention_with_received,
    collect_received_attention,
)
from xtf_kernels.documents import documents

HAS_TRITON = importlib.util.find_spec("triton") is not None
ATTN_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
#: where the Triton kernels run: a CUDA device when there is one, else the CPU interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(backend: str, **tensors):
    """The tensors on the device ``backend`` runs on (None stays None)."""
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    return {k: None if t is None else t.to(dev) for k, t in tensors.items()}

#: documents of a packed row: odd lengths, one-token documents, one longer than a tile
LENS = [5, 1, 13, 1, 7, 20]


def _positions(lens: list[int], pad: int = 0) -> torch.Tensor:
    """[L] positions restarting at 0 per document; ``pad`` trailing padding positions (0s)."""
    return torch.cat([torch.arange(n) for n in lens] + [torch.zeros(pad, dtype=torch.long)])


def _qkv(B, Hq, Hkv, L, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, L, D, generator=g) * 1.5).to(dtype)
    k = (torch.randn(B, Hkv, L, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k, v


def per_document_reference(q, k, row_lens, **kw):
    """fp32 [B, Hq, L]: :func:`reference` run on every document alone, then concatenated.

    ``row_lens[b]`` lists row b's document lengths; positions after them are padding (0).
    """
    B, Hq, L, _ = q.shape
    out = torch.zeros(B, Hq, L)
    for b, lens in enumerate(row_lens):
        s = 0
        for n in lens:
            out[b : b + 1, :, s : s + n] = reference(q[b : b + 1, :, s : s + n], k[b : b + 1, :, s : s + n], **kw)
            s += n
    return out


def per_document_output(q, k, v, row_lens, *, causal=True, window=None, softcap=None, scale=None):
    """float64 [B, Hq, L, D] attention outputs, document by document (0 at padding)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, L, v.shape[-1], dtype=torch.float64)
    for b, lens in enumerate(row_lens):
        s0 = 0
        for n in lens:
            qs = q[b, :, s0 : s0 + n].double()
            ks = k[b, :, s0 : s0 + n].double().repeat_interleave(G, 0)
            vs = v[b, :, s0 : s0 + n].double().repeat_interleave(G, 0)
            s = qs @ ks.transpose(-1, -2) * (scale if scale is not None else D**-0.5)
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            ok = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
            if window is not None:
                ok = ok & ((i - j < window) if causal else ((i - j).abs() <= window))
            out[b, :, s0 : s0 + n] = torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ vs
            s0 += n
    return out


CASES = [
    # causal, window, softcap, scale
    (True, None, None, None),
    (True, 3, None, None),
    (True, 4, 2.0, 0.3),
    (False, None, None, None),
    (False, 2, 3.0, None),
]


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "c{}w{}cap{}s{}".format(*c))
def test_packed_row_equals_documents_run_alone(backend, case):
    causal, window, softcap, scale = case
    L = sum(LENS)
    q, k, _ = _qkv(1, 4, 2, L, 8)
    pos = _positions(LENS)[None]
    cu = torch.tensor([0] + list(torch.tensor(LENS).cumsum(0)))
    for reduce in ("mean_over_queries", "sum"):
        want = per_document_reference(
            q, k, [LENS], scale=scale, causal=causal, window=window, softcap=softcap, reduce=reduce
        )
        for block in (16, None):
            for docs in (dict(position_ids=pos), dict(cu_seqlens=cu)):
                got = attention_received(
                    **_on(backend, q=q, k=k, **docs), scale=scale, causal=causal, sliding_window=window,
                    softcap=softcap, reduce=reduce, backend=backend, block=block,
                ).cpu()
                assert got.shape == (1, 4, L) and got.dtype == torch.float32
                torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_batch_of_packed_rows_with_padding_fp64(backend):
    # two rows with different layouts, trailing padding in row 0, position_ids [B, L]
    rows = [[3, 1, 9, 6], [1, 1, 17, 2]]
    L = 21
    pad0 = L - sum(rows[0])
    pos = torch.stack([_positions(rows[0], pad0), _positions(rows[1])])
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, L - pad0 :] = 0
    q, k, _ = _qkv(2, 6, 3, L, 20, seed=1, dtype=torch.float64)
    for reduce in ("mean_over_queries", "sum"):
        want = per_document_reference(q, k, rows, window=5, reduce=reduce)
        got = attention_received(
            **_on(backend, q=q, k=k, attention_mask=mask, position_ids=pos), sliding_window=5, reduce=reduce,
            backend=backend, block=16,
        ).cpu()
        # fp64 inputs: the torch backend computes in fp64 (then rounds to the fp32 result); Triton in fp32
        tol = dict(atol=1e-7, rtol=2.5e-7) if backend == "torch" else dict(atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(got, want, **tol)
        assert torch.all(got[0, :, L - pad0 :] == 0)
    # every real query of a document gives probability 1 to its own document's keys
    summed = attention_received(
        **_on(backend, q=q, k=k, attention_mask=mask, position_ids=pos), reduce="sum", backend=backend
    ).cpu()
    s = 0
    for n in rows[1]:
        torch.testing.assert_close(summed[1, :, s : s + n].sum(-1), torch.full((6,), float(n), dtype=torch.float32))
        s += n


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_output_and_scores_together_equal_documents_alone(backend, dtype):
    L = sum(LENS)
    q, k, v = _qkv(1, 4, 2, L, 16, seed=2, dtype=dtype)
    pos = _positions(LENS)[None]
    for causal, window, softcap in ((True, None, None), (True, 6, 2.5), (False, None, None)):
        out, recv = attention_with_received(
            **_on(backend, q=q, k=k, v=v, position_ids=pos), causal=causal, sliding_window=window, softcap=softcap,
            backend=backend, block=16,
        )
        out, recv = out.cpu(), recv.cpu()
        assert out.dtype == dtype and out.shape == (1, 4, L, 16)
        want_out = per_document_output(q, k, v, [LENS], causal=causal, window=window, softcap=softcap)
        want_recv = per_document_reference(q, k, [LENS], causal=causal, window=window, softcap=softcap)
        tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(out.double(), want_out, **tol)
        torch.testing.assert_close(recv, want_recv, atol=2e-6 if dtype != torch.float16 else 1e-5, rtol=1e-4)
        only_out, none = attention_with_received(
            **_on(backend, q=q, k=k, v=v, position_ids=pos), causal=causal, sliding_window=window, softcap=softcap,
            reduce=None, backend=backend, block=16,
        )
        assert none is None
        torch.testing.assert_close(only_out.cpu(), out)


def test_documents_layout():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1], [5, 6, 0, 1, 2, 3]])
    d = documents(pos, None, 2, 6, torch.device("cpu"))
    # row 1 starts a document at index 0 even though its position is 5 (a row start always does)
    assert d.start.tolist() == [[0, 0, 0, 3, 4, 4], [0, 0, 2, 2, 2, 2]]
    assert d.end.tolist() == [[3, 3, 3, 4, 6, 6], [2, 2, 6, 6, 6, 6]]
    cu = torch.tensor([0, 3, 4, 6, 8, 12])
    d2 = documents(None, cu, 2, 6, torch.device("cpu"))
    assert d2.start.tolist() == [[0, 0, 0, 3, 4, 4], [0, 0, 2, 2, 2, 2]]
    assert documents(torch.arange(6)[None], None, 2, 6, torch.device("cpu")) is None  # one per row
    assert documents(None, None, 2, 6, torch.device("cpu")) is None


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(position_ids=torch.zeros(1, 7, dtype=torch.long)), ValueError, "position_ids"),
        (dict(position_ids=torch.zeros(3, 8, dtype=torch.long)), ValueError, "position_ids"),
        (dict(position_ids=torch.zeros(1, 8)), TypeError, "position_ids"),
        (dict(position_ids=[0, 1]), TypeError, "position_ids"),
        (dict(cu_seqlens=torch.tensor([0, 3, 8])), ValueError, "cu_seqlens"),  # B * L = 16
        (dict(cu_seqlens=torch.tensor([0, 9, 5, 16])), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 12, 16])), ValueError, "cross rows"),
        (dict(cu_seqlens=torch.tensor([[0, 16]])), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0.0, 16.0])), TypeError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 8, 16]), position_ids=torch.zeros(2, 8, dtype=torch.long)),
         ValueError, "either"),
    ],
)
def test_bad_document_inputs_name_the_argument(kwargs, exc, words):
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    with pytest.raises(exc, match=words):
        attention_received(q, k, **kwargs)


def test_bad_values_name_the_argument():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="v:"):
        attention_with_received(q, k, torch.randn(1, 2, 7, 16))
    with pytest.raises(TypeError, match="v:"):
        attention_with_received(q, k, torch.randn(1, 2, 8, 16).double())
    with pytest.raises(TypeError, match="v:"):
        attention_with_received(q, k, None)


# ---------------------------------------------------------------------------------------------
# Blocks in other documents are skipped, not masked


def _visible_tile_pairs(start: torch.Tensor, L: int, T: int) -> int:
    """Number of (query tile, key tile) pairs holding at least one visible (causal, same-doc) pair."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    ok = (j <= i) & (start[:, None] == start[None, :])
    n = -(-L // T)
    pad = torch.zeros(n * T, n * T, dtype=torch.bool)
    pad[:L, :L] = ok
    return int(pad.view(n, T, n, T).any(dim=(1, 3)).sum())


def test_torch_backend_skips_other_documents(monkeypatch):
    lens = [40, 3, 70, 1, 30, 60]
    L = sum(lens)
    q, k, _ = _qkv(1, 2, 1, L, 8, seed=3)
    pos = _positions(lens)[None]
    computed = []
    real_matmul = torch.matmul

    def counting_matmul(a, b, *args, **kw):
        r = real_matmul(a, b, *args, **kw)
        computed.append(r.shape[-2] * r.shape[-1])
        return r

    import xtf_kernels.attention.torch_impl as ti

    monkeypatch.setattr(ti.torch, "matmul", counting_matmul)
    got = attention_received(q, k, position_ids=pos, backend="torch", block=16)
    packed = sum(computed)
    computed.clear()
    attention_received(q, k, backend="torch", block=16)
    single = sum(computed)
    # no score outside the documents' own [n, n] squares (2 query heads per key head)
    assert packed <= 2 * sum(n * n for n in lens) and packed < 0.45 * single
    torch.testing.assert_close(got, per_document_reference(q, k, [lens]), atol=2e-6, rtol=2e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_backend_skips_other_documents():
    from xtf_kernels.attention.triton_impl import attend_triton

    lens = [40, 3, 70, 1, 30, 60]
    L = sum(lens)
    q, k, v = _on("triton", **dict(zip("qkv", _qkv(1, 2, 1, L, 16, seed=4)))).values()
    dev = q.device
    pos = _positions(lens)[None].to(dev)
    docs = documents(pos, None, 1, L, dev)
    valid = torch.ones(1, L, dtype=torch.bool, device=dev)
    counts = torch.zeros(2, dtype=torch.int32, device=dev)
    kw = dict(scale=0.25, causal=True, window=None, softcap=None, block=16)
    attend_triton(q, k, v, valid, docs, tile_counts=counts, **kw)
    want = _visible_tile_pairs(docs.start[0].cpu(), L, 16) * 2  # per head
    # kernel 1 (output + lse) and kernel 2 (received) visit exactly the tiles holding visible pairs
    assert counts.tolist() == [want, want]
    counts.zero_()
    attend_triton(q, k, v, valid, None, tile_counts=counts, **kw)
    n = -(-L // 16)
    assert counts.tolist() == [n * (n + 1)] * 2 and want < 0.45 * n * (n + 1)


# ---------------------------------------------------------------------------------------------
# Hugging Face models: packed rows vs each document run alone with eager attention

ROW_LENS = [[6, 1, 9, 5], [4, 11, 1, 5]]  # two packed rows of 21 tokens


def _packed_batch(vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = sum(ROW_LENS[0])
    ids = torch.randint(3, vocab, (2, L), generator=g)
    pos = torch.stack([_positions(r) for r in ROW_LENS])
    return ids, pos


def _eager_per_document(model, arch, ids, *, layers=None, reduce="mean_over_queries"):
    """Received attention and final hidden states of every document run alone (eager)."""
    ri = torch.zeros(ids.shape)
    hidden = torch.zeros(*ids.shape, model.config.hidden_size)
    for b, lens in enumerate(ROW_LENS):
        s = 0
        for n in lens:
            doc = ids[b : b + 1, s : s + n]
            ones = torch.ones_like(doc)
            ri[b, s : s + n] = eager_received(model, arch, doc, ones, layers=layers, reduce=reduce)[0]
            with torch.no_grad():
                hidden[b, s : s + n] = model.model(input_ids=doc, attention_mask=ones).last_hidden_state[0]
            s += n
    return ri, hidden


@pytest.fixture(scope="module")
def tiny_models():
    return make_tiny_models()


@pytest.mark.parametrize("arch", list(WINDOWS))
def test_collector_on_packed_rows_equals_documents_alone(tiny_models, arch):
    model = tiny_models[arch]
    ids, pos = _packed_batch()
    for reduce in ("mean_over_queries", "sum"):
        want, want_hidden = _eager_per_document(model, arch, ids, reduce=reduce)
        got = collect_received_attention(model, ids, None, position_ids=pos, reduce=reduce)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # the layer outputs honour the documents too: the packed forward's hidden states are the
    # documents' own (position_ids reach the model and the attention)
    col = ReceivedAttentionCollector(None, layers=[-1])
    with torch.no_grad(), col.attach(model):
        hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-5)
    want_last, _ = _eager_per_document(model, arch, ids, layers=[-1])
    torch.testing.assert_close(col.result(), want_last, atol=1e-6, rtol=1e-5)


def test_collector_reads_packed_kwargs(tiny_models):
    """Documents from the kwargs transformers passes to the attention function."""
    model = tiny_models["llama"]
    ids, pos = _packed_batch(seed=1)
    flat_ids, flat_pos = ids.reshape(1, -1), pos.reshape(1, -1)  # padding-free: one row
    want, _ = _eager_per_document(model, "llama", ids)
    want = want.reshape(1, -1)
    lens = torch.tensor([n for r in ROW_LENS for n in r])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    runs = {
        # position_ids reach the attention function as a keyword argument
        "position_ids": dict(position_ids=flat_pos),
        # DataCollatorWithFlattening(return_flash_attn_kwargs=True): cu_seq_lens_* / max_length_*
        "cu_seq_lens": dict(position_ids=flat_pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                            max_length_q=int(lens.max()), max_length_k=int(lens.max())),
    }
    for name, kw in runs.items():
        col = ReceivedAttentionCollector(None)  # no documents given: read from the call
        with torch.no_grad(), col.attach(model):
            model.model(input_ids=flat_ids, use_cache=False, **kw)
        torch.testing.assert_close(col.result(), want, atol=1e-6, rtol=1e-5, msg=name)


def test_collector_reused_across_batches(tiny_models):
    """One collector, two batches with different packings (and an in-place change): no stale documents."""
    model = tiny_models["llama"]
    ids, pos = _packed_batch(seed=3)
    flat_ids, flat_pos = ids.reshape(1, -1), pos.reshape(1, -1)
    want, _ = _eager_per_document(model, "llama", ids)
    col = ReceivedAttentionCollector(None)
    buf = torch.arange(flat_ids.shape[1])[None]  # first: one document
    for positions, expect in ((buf, None), (flat_pos, want.reshape(1, -1))):
        if expect is not None:
            buf.copy_(positions)  # same tensor object, new values
        col.reset()
        with torch.no_grad(), col.attach(model):
            model.model(input_ids=flat_ids, position_ids=buf, use_cache=False)
        if expect is None:
            one_doc = eager_received(model, "llama", flat_ids, torch.ones_like(flat_ids))
            torch.testing.assert_close(col.result(), one_doc, atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(col.result(), expect, atol=1e-6, rtol=1e-5)


def test_collector_packed_with_padding_mask(tiny_models):
    """A packed row followed by padding, with an attention mask and position_ids together."""
    model = tiny_models["qwen2"]
    ids, pos = _packed_batch(seed=2)
    ids, pos = ids[:1].clone(), pos[:1].clone()
    L = ids.shape[1]
    ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    pos = torch.cat([pos, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.ones_like(ids)
    mask[:, L:] = 0
    got = collect_received_attention(model, ids, mask, position_ids=pos)
    ri = torch.zeros(1, L)
    s = 0
    for n in ROW_LENS[0]:
        doc = ids[:, s : s + n]
        ri[0, s : s + n] = eager_received(model, "qwen2", doc, torch.ones_like(doc))[0]
        s += n
    torch.testing.assert_close(got[:, :L], ri, atol=1e-6, rtol=1e-5)
    assert torch.all(got[:, L:] == 0)


def test_collector_document_inputs(tiny_models):
    model = tiny_models["llama"]
    ids, pos = _packed_batch()
    with pytest.raises(ValueError, match="position_ids"):
        collect_received_attention(model, ids, None, position_ids=pos[:, :-1])
    with pytest.raises(TypeError, match="position_ids"):
        collect_received_attention(model, ids, None, position_ids=pos.float())
    with pytest.raises(ValueError, match="either"):
        ReceivedAttentionCollector(None, position_ids=pos, cu_seqlens=torch.tensor([0, 42]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        ReceivedAttentionCollector(None, cu_seqlens=[0, 42])
    col = ReceivedAttentionCollector(None, cu_seqlens=torch.tensor([0, 5, 40]))  # does not end at B * L = 42
    with pytest.raises(ValueError, match="cu_seqlens"), torch.no_grad(), col.attach(model):
        model.model(input_ids=ids, use_cache=False)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_packed_triton_matches_sdpa_per_document(dtype):
    """A long packed row on the GPU: output vs SDPA per document, scores vs the torch backend."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    lens = torch.randint(32, 1025, (12,), generator=g).tolist()
    L = sum(lens)
    q, k, v = (t.to("cuda", dtype) for t in _qkv(1, 16, 8, L, 128, seed=6))
    pos = _positions(lens)[None].cuda()
    out, recv = attention_with_received(q, k, v, position_ids=pos, backend="triton")
    ref_out = torch.empty_like(out, dtype=torch.float32)
    s = 0
    for n in lens:
        sl = slice(s, s + n)
        ref_out[:, :, sl] = F.scaled_dot_product_attention(
            q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float(), is_causal=True, enable_gqa=True
        )
        s += n
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    want = attention_received(q, k, position_ids=pos, backend="torch")
    torch.testing.assert_close(recv, want, atol=1e-5 if dtype == torch.float32 else 1e-3, rtol=1e-3)
