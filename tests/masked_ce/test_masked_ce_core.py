"""The masked_ce core as a package: one options path, the backend contract, the outputs tuple,
and the pure functions of :mod:`xtf_kernels.loss.core`."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xtf_kernels
from xtf_kernels import MaskedCE, MaskedCESpec, masked_ce
from xtf_kernels.backends import CEConfig, load_backend
from xtf_kernels.backends.base import BackendBase
from xtf_kernels.backends.torch_backend import TorchBackend
from xtf_kernels.config import DEFAULT_CHUNK_ELEMS, Options
from xtf_kernels.loss import MaskedCEOutputs, core

PKG = Path(xtf_kernels.__file__).resolve().parent


def _problem(N=9, D=8, V=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[2] = -100
    return h, w, y


# ------------------------------------------------------------------ options
def test_check_labels_reads_the_environment_at_call_time(monkeypatch):
    h, w, y = _problem()
    bad = y.clone()
    bad[0] = 999
    monkeypatch.setenv("XTF_CHECK_LABELS", "1")
    assert xtf_kernels.get_options().check_labels is True
    with pytest.raises(ValueError, match="labels: expected values in"):
        masked_ce(h, w, bad, backend="torch")
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv("XTF_CHECK_LABELS", off)  # set after import: it counts
        assert xtf_kernels.get_options().check_labels is False
    with xtf_kernels.options(check_labels=True):  # an explicit option wins over the environment
        assert xtf_kernels.get_options().check_labels is True


def test_one_chunk_elems_default():
    assert Options().chunk_elems == CEConfig().chunk_elems == DEFAULT_CHUNK_ELEMS
    assert xtf_kernels.get_options().chunk_elems == DEFAULT_CHUNK_ELEMS


def _record_backward(monkeypatch):
    seen = []
    be = load_backend("torch")
    real = be.backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(be, "backward", spy)
    return seen


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_uses_the_options_of_its_forward(monkeypatch, compiled):
    """Options are resolved once per call, when the forward runs: a backward run after the
    options changed (eager recompute path, and the custom op's backward) uses the forward's."""
    seen = _record_backward(monkeypatch)
    h, w, y = _problem()
    hh = h.clone().requires_grad_()

    def loss_fn(x):
        return masked_ce(x, w, y, backend="torch")

    fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
    with xtf_kernels.options(chunk_elems=96, grad_in_forward=False):
        loss = fn(hh)
    with xtf_kernels.options(chunk_elems=1 << 20, grad_in_forward=True):
        loss.backward()
    assert [c.chunk_elems for c in seen] == [96]
    ref = h.clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref @ w.t(), y).backward()
    torch.testing.assert_close(hh.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_hand_built_spec_resolves_options_in_the_forward(monkeypatch):
    seen = _record_backward(monkeypatch)
    h, w, y = _problem()
    hh = h.clone().requires_grad_()
    spec = MaskedCESpec(backend="torch")
    assert spec.grad_in_forward is None and spec.chunk_elems is None
    with xtf_kernels.options(chunk_elems=128, grad_in_forward=False):
        outs = MaskedCE.apply(hh, w, y, None, None, None, None, None, spec)
    outs[0].backward()
    assert len(outs) == 9 and [c.chunk_elems for c in seen] == [128]
    pinned = MaskedCESpec(backend="torch", grad_in_forward=True, chunk_elems=64, check_labels=True)
    assert pinned.resolved() is pinned and pinned.ce_config().chunk_elems == 64
    with pytest.raises(ValueError, match="resolve"):
        spec.ce_config()



def test_every_option_is_a_spec_field_resolved_from_the_options():
    """Each ``Options`` field is a ``MaskedCESpec`` field left None by default, and ``resolved()``
    fills every one of them from ``get_options()`` (one list: the ``Options`` dataclass)."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(Options)]
    spec_defaults = {f.name: f.default for f in dataclasses.fields(MaskedCESpec)}
    assert all(spec_defaults.get(n, "missing") is None for n in names), spec_defaults
    with xtf_kernels.options(grad_in_forward=False, chunk_elems=4096, check_labels=False):
        got = MaskedCESpec().resolved()
        want = xtf_kernels.get_options()
    assert {n: getattr(got, n) for n in names} == {n: getattr(want, n) for n in names}

# ------------------------------------------------------------------ outputs
def test_outputs_are_named_in_apply_order():
    h, w, y = _problem()
    keep = torch.rand(9, generator=torch.Generator().manual_seed(1)) > 0.3
    ref_lp = -torch.rand(9)
    outs = MaskedCEOutputs(*MaskedCE.apply(h, w, y, None, keep, ref_lp, None, None,
                                           MaskedCESpec(backend="torch")))
    loss, stats = masked_ce(h, w, y, keep=keep, ref_logprobs=ref_lp, return_stats=True, backend="torch")
    torch.testing.assert_close(outs.loss, loss)
    torch.testing.assert_close(outs.logprob, stats.logprob, equal_nan=True)
    torch.testing.assert_close(outs.logprob_delta, stats.logprob_delta, equal_nan=True)
    assert outs.relevance.numel() == 0 and stats.relevance is None
    assert torch.equal(outs.keep, stats.keep) and outs.lse_parts.shape == (2, 9)
    torch.testing.assert_close(outs.lse_parts.sum(0), stats.lse, equal_nan=True)


# ------------------------------------------------------------------ backend contract
class _DefaultRowwise(TorchBackend):
    """A backend that relies on the contract's default ``forward_rowwise``."""

    forward_rowwise = BackendBase.forward_rowwise


@pytest.mark.parametrize("name", ["torch", "native", "triton"])
def test_every_backend_implements_the_typed_contract(name):
    ok, why = xtf_kernels.backend_status()[name]
    if not ok:
        pytest.skip(why)
    be = load_backend(name)
    assert isinstance(be, BackendBase)
    assert type(be).forward_rowwise is not BackendBase.forward_rowwise  # the one-GEMM version


def test_default_forward_rowwise_matches_the_one_gemm_version():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)
    b, y = torch.randn(50, generator=g) * 0.1, torch.randint(0, 50, (40,), generator=g)
    cfg = CEConfig(softcap=5.0, label_smoothing=0.1, z_loss=1e-3, chunk_elems=50 * 7)

    def sel(s, e, mx, lse, gold, ent):
        return (gold - lse) < -4.0

    a, sa = TorchBackend().forward_rowwise(x, w, b, y, cfg, sel)
    c, sc = _DefaultRowwise().forward_rowwise(x, w, b, y, cfg, sel)
    assert torch.equal(sa, sc) and 0 < int(sa.sum()) < 40
    for f in ("row_max", "lse", "gold", "entropy", "sum_logits", "dx", "dw", "db"):
        torch.testing.assert_close(getattr(c, f).float(), getattr(a, f).float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ pure functions
def test_positions_and_row_order():
    labels = torch.tensor([[5, 1, -100, 2], [3, -100, 4, 0]])
    keep = torch.tensor([[True, False, True, True], [True, True, True, False]])
    pos = core.positions(labels, keep, ignore_index=-100, shift=True)
    assert pos.valid.tolist() == [False, True, False, True, False, False, True, True]
    assert pos.kept.tolist() == [False, False, False, True, False, False, True, False]
    assert torch.equal(pos.src, torch.arange(8) - 1)
    assert torch.equal(core.source_rows(labels, shift=True), pos.src)
    rows, n_kept = core.row_order(pos, with_masked=True)
    assert rows.tolist() == [3, 6, 1, 7] and n_kept == 2
    assert core.row_order(pos, with_masked=False)[0].tolist() == [3, 6]


def test_loss_formula_and_reductions():
    st = core.RowStats(row_max=torch.tensor([1e6, 2.0]), lse=torch.tensor([0.5, 0.25]),
                       gold=torch.tensor([-0.5, 0.0]), entropy=torch.zeros(2),
                       sum_logits=torch.tensor([-3.0, -1.0]))
    kept = torch.tensor([True, False])
    tok = core.token_loss(st, kept, label_smoothing=0.0, z_loss=0.0, vocab=4)
    assert tok.tolist() == [1.0, 0.0]  # lse - gold, without the 1e6 offset
    tok = core.token_loss(st, kept, label_smoothing=0.2, z_loss=0.0, vocab=4)
    torch.testing.assert_close(tok, torch.tensor([0.5 + 0.8 * 0.5 + 0.2 * 3.0 / 4, 0.0]))
    loss, div = core.reduce_loss(tok, reduction="mean", num_items=None, n_kept=1, shape=(2,))
    assert div.item() == 1 and loss.item() == pytest.approx(tok[0].item())
    loss, div = core.reduce_loss(tok, reduction="none", num_items=None, n_kept=1, shape=(1, 2))
    assert loss.shape == (1, 2) and div is None
    with pytest.raises(ValueError, match="num_items: 0"):
        core.reduce_loss(tok, reduction="mean", num_items=0, n_kept=1, shape=(2,))
    loss, _ = core.reduce_loss(tok * 0, reduction="mean", num_items=7, n_kept=0, shape=(2,))
    assert loss.item() == 0.0


# ------------------------------------------------------------------ layout
def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out |= {f"{node.module}.{a.name}" if node.module else a.name for a in node.names}
            out.add(node.module or "")
    return out


def test_the_autograd_function_and_the_custom_op_do_not_import_each_other():
    pkg = PKG / "loss"
    assert not any("custom_op" in m for m in _imports(pkg / "autograd.py"))
    assert not any("autograd" in m for m in _imports(pkg / "custom_op.py"))
    assert not any(m.endswith("ops") or "api" in m for m in _imports(pkg / "custom_op.py"))


def test_public_names_and_the_ops_reexport():
    from xtf_kernels import ops

    assert xtf_kernels.masked_ce is ops.masked_ce  # the function, not the package
    for name in ("MaskedCE", "MaskedCESpec", "rowwise", "masked_ce"):
        assert getattr(ops, name) is getattr(xtf_kernels, name)


def test_masked_ce_is_the_function_however_it_is_reached():
    """Issue 19: ``xtf_kernels.masked_ce`` resolves one way, to the function. Its package is
    ``xtf_kernels.loss``: importing the package or its modules (lazily, in any order, in a fresh
    interpreter) never replaces the function, and no module of the package is called
    ``masked_ce`` (so ``import xtf_kernels.masked_ce`` cannot give a module)."""
    assert not (PKG / "masked_ce.py").exists() and not (PKG / "masked_ce" / "__init__.py").exists()
    code = (
        "import inspect, xtf_kernels\n"
        "import xtf_kernels.loss.core, xtf_kernels.loss.custom_op, xtf_kernels.ops\n"
        "from xtf_kernels import masked_ce\n"
        "from xtf_kernels.loss import masked_ce as m2\n"
        "assert inspect.isfunction(masked_ce), masked_ce\n"
        "assert masked_ce is xtf_kernels.masked_ce is m2 is xtf_kernels.ops.masked_ce\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_row_stats_travel_by_name():
    """RowStats / ForwardOut.stats / select_rows: the boundary carries the fields by name."""
    from xtf_kernels.backends.base import ForwardOut, RowStats, select_rows

    st = RowStats(*(torch.arange(4.0) + 10 * i for i in range(5)))
    fo = ForwardOut.of(st)
    assert fo.stats == st and fo.dx is None
    assert fo.gold is st.gold and fo.sum_logits is st.sum_logits
    seen = {}

    def rule(s, e, row_max, lse, gold, entropy):
        seen.update(row_max=row_max, lse=lse, gold=gold, entropy=entropy)
        return gold > 21

    assert select_rows(rule, 1, 3, st.rows(1, 3)).tolist() == [False, True]
    assert seen["gold"].tolist() == [21.0, 22.0] and seen["entropy"].tolist() == [31.0, 32.0]
    out = RowStats.empty(4)
    out.put(0, 4, st)
    assert all(torch.equal(a, b) for a, b in zip(out, st))


def test_token_stats_is_built_in_one_place():
    st = core.RowStats(row_max=torch.tensor([5.0]), lse=torch.tensor([0.5]), gold=torch.tensor([-0.25]),
                       entropy=torch.tensor([0.1]), sum_logits=torch.tensor([-3.0]))
    ts = core.token_stats(st, keep=torch.tensor([True]), ref_logprobs=torch.tensor([-1.0]),
                          relevance=torch.tensor([0.3]))
    assert ts.logprob.tolist() == [-0.75] and ts.lse.tolist() == [5.5]
    assert ts.logprob_delta.tolist() == [0.25] and torch.equal(ts.relevance, torch.tensor([0.3]))
    assert math.isclose(ts.prob.item(), math.exp(-0.75), rel_tol=1e-6)
