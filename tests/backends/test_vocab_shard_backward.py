"""``backward(..., vocab_start=, vocab=)`` on vocabulary shards adds up to the whole backward.

The contract (``xtf_kernels/backends/base.py``): on the shard ``[vocab_start, vocab_start +
w.shape[0])`` of a vocabulary of ``vocab`` ids, with the global row maximum and log-sum-exp,
``dx`` is the shard's part of the sum over shards and ``dw`` / ``db`` are the shard's rows of
the whole gradient. Label smoothing spreads over ``vocab``; the gold term applies only on the
shard that holds the label.
"""

from __future__ import annotations

import pytest
import torch

from xtf_kernels.backends import CEConfig, load_backend

SHARDS = ((0, 17), (17, 40), (40, 53))  # uneven; 53 ids
V = SHARDS[-1][1]


def _inputs(dtype, device, bias: bool):
    g = torch.Generator().manual_seed(3)
    M, D = 11, 16
    x = (torch.randn(M, D, generator=g) * 0.7).to(dtype).to(device)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=g) * 0.2).to(dtype).to(device) if bias else None
    y = torch.randint(0, V, (M,), generator=g)
    y[:3] = torch.tensor([0, 17, V - 1])  # shard edges
    scale = torch.rand(M, generator=g).to(device) + 0.5
    return x, w, b, y.to(device), scale


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shards_add_up_to_the_whole_backward(backend, device, opts, bias, dtype):
    be = load_backend(backend)
    if not be.supports(torch.device(device), dtype)[0]:
        pytest.skip(f"{backend} does not run {dtype} on {device}")
    x, w, b, y, scale = _inputs(dtype, device, bias)
    cfg = CEConfig(chunk_elems=64, **opts)  # several vocabulary blocks per shard
    fo = be.forward(x, w, b, y, cfg, 0)
    whole = be.backward(x, w, b, y, fo.row_max, fo.lse, scale, cfg)
    dx = torch.zeros_like(whole.dx, dtype=torch.float64)
    dws, dbs = [], []
    for s, e in SHARDS:
        part = be.backward(
            x,
            w[s:e],
            None if b is None else b[s:e],
            y,
            fo.row_max,
            fo.lse,
            scale,
            cfg,
            vocab_start=s,
            vocab=V,
        )
        assert part.dw.shape == (e - s, w.shape[1])
        dx += part.dx.double()
        dws.append(part.dw.double())
        if b is not None:
            dbs.append(part.db.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx, whole.dx.double(), **tol)
    torch.testing.assert_close(torch.cat(dws), whole.dw.double(), **tol)
    if b is not None:
        torch.testing.assert_close(torch.cat(dbs), whole.db.double(), **tol)


def test_without_the_keywords_a_shard_is_a_whole_vocabulary(backend, device):
    """The defaults keep the old meaning: a shard passed without them is its own vocabulary
    (smoothing over its width, gold ids relative to it), which differs from its slice of the
    whole gradient: the keywords are what makes the shards add up."""
    be = load_backend(backend)
    x, w, b, y, scale = _inputs(torch.float32, device, False)
    cfg = CEConfig(chunk_elems=64, label_smoothing=0.1)
    fo = be.forward(x, w, b, y, cfg, 0)
    whole = be.backward(x, w, b, y, fo.row_max, fo.lse, scale, cfg)
    s, e = SHARDS[1]
    ys = (y - s).clamp(0, e - s - 1)
    alone = be.backward(x, w[s:e], None, ys, fo.row_max, fo.lse, scale, cfg)
    assert not torch.allclose(alone.dw, whole.dw[s:e], rtol=1e-4, atol=1e-5)
