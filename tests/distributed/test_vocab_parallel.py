"""Vocabulary-parallel masked_ce: 2 and 4 spawned gloo processes, each holding uneven rows of the
LM head, against one process on the whole head.

Criterion: the float64 oracle's, with the single-process run as the baseline:
``|ref64 - parallel| <= |ref64 - single process| + tol`` elementwise, for the loss, every
statistic and every gradient (``dW`` / ``db`` reassembled from the ranks' rows).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests._reference import reference_masked_ce
from tests.distributed._vp_cases import CASES, NO_GOLD, SPLITS, call_kwargs, inputs
from tests.masked_ce.test_masked_ce import assert_close_crit
from xtf_kernels import VocabParallel, masked_ce
from xtf_kernels.documents import check_position_ids, mask_unpredicted

pytestmark = pytest.mark.distributed

BACKENDS = ("torch", "native")
STATS = ("logprob", "prob", "entropy", "lse", "logprob_delta", "relevance")



def _dtensor_case_loss(hidden, weight, bias, labels, keep):
    """The masked_ce call of the DTensor cases (sharded on the ranks, whole in the reference)."""
    return masked_ce(hidden, weight, labels, bias=bias, keep=keep, shift=True, label_smoothing=0.1,
                     z_loss=1e-3, return_stats=True)

def _grads(loss, leaves, upstream):
    loss.backward(upstream if loss.dim() else None)
    return [None if p is None else p.grad.detach().clone() for p in leaves]


def _run(backend: str, name: str, world: int, start: int | None, stop: int | None, vp) -> dict:
    """One case on rows [start, stop) of the head (the whole head when start is None)."""
    dtype, spec = CASES[name]
    t = inputs(dtype, world)
    rows = slice(start, stop)
    h = t["hidden"].clone().requires_grad_()
    w = t["weight"][rows].clone().requires_grad_()
    b = t["bias"][rows].clone().requires_grad_() if spec.get("bias") else None
    kw = call_kwargs(spec, t, b)
    if vp is not None:
        kw["vocab_parallel"] = vp
    loss, stats = masked_ce(h, w, t["labels"], return_stats=True, backend=backend, **kw)
    dh, dw, db = _grads(loss, [h, w, b], t["upstream"])
    out = {f: getattr(stats, f) for f in STATS}
    return dict(loss=loss.detach(), keep=stats.keep, dh=dh, dw=dw, db=db, **out)


def _dtensor_runs(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for tag, vocab in (("dtensor", None), ("dtensor_tiny", 5)):
        t = inputs(torch.float32, world)
        weight, bias, labels = t["weight"], t["bias"], t["labels"]
        if vocab is not None:  # torch chunks 5 rows over 4 ranks as 2, 2, 1, 0: an empty shard
            weight, bias = weight[:vocab], bias[:vocab]
            labels = torch.where(labels >= 0, labels % vocab, labels)
        wd = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        bd = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
        h = t["hidden"].clone().requires_grad_()
        hd = distribute_tensor(h.detach(), mesh, [Replicate()]).requires_grad_()
        loss, stats = _dtensor_case_loss(hd, wd, bd, labels, t["keep"])
        loss.backward()
        out[tag] = dict(
            loss=loss.detach(),
            logprob=stats.logprob,
            entropy=stats.entropy,
            dh=hd.grad.to_local(),
            dw=wd.grad.full_tensor(),
            db=bd.grad.full_tensor(),
            local_rows=wd.to_local().shape[0],
        )
    return out


def _errors(world: int, rank: int) -> dict:
    """The messages of the refusals, raised the same way on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    t = inputs(torch.float32, world)
    h, w, y = t["hidden"], t["weight"], t["labels"]
    start, stop = SPLITS[world][rank]
    mesh = init_device_mesh("cpu", (world,))
    cases = {
        "overlap": lambda: masked_ce(
            h, w[: stop - start], y, vocab_parallel=VocabParallel(0, stop - start)
        ),
        "rows": lambda: masked_ce(
            h, w[start : stop - 1], y, vocab_parallel=VocabParallel(start, stop)
        ),
        "replicated_weight": lambda: masked_ce(h, distribute_tensor(w, mesh, [Replicate()]), y),
        "dim1_weight": lambda: masked_ce(h, distribute_tensor(w, mesh, [Shard(1)]), y),
        "both": lambda: masked_ce(
            h, distribute_tensor(w, mesh, [Shard(0)]), y, vocab_parallel=VocabParallel(start, stop)
        ),
        "vocab_size": lambda: masked_ce(
            h, w[start:stop], y, vocab_parallel=VocabParallel(start, stop, vocab_size=V_WRONG)
        ),
    }
    out = {}
    for k, fn in cases.items():
        try:
            fn()
            out[k] = None
        except (ValueError, TypeError, RuntimeError) as exc:
            out[k] = f"{type(exc).__name__}: {exc}"
    return out


V_WRONG = 102


def _compiled(world: int, rank: int) -> dict:
    """torch.compile over a vocabulary-parallel call: one graph break, the eager result."""
    start, stop = SPLITS[world][rank]
    vp = VocabParallel(start, stop)
    t = inputs(torch.float32, world)

    def step(h, w, y):
        return masked_ce(h * 1.0, w, y, vocab_parallel=vp, label_smoothing=0.1)

    res = {}
    for tag, fn in (("eager", step), ("compiled", torch.compile(step, backend="eager"))):
        h = t["hidden"].clone().requires_grad_()
        w = t["weight"][start:stop].clone().requires_grad_()
        loss = fn(h, w, t["labels"])
        loss.backward()
        res[tag] = (loss.detach(), h.grad, w.grad)
    return res


GRAD_FILTER = dict(threshold=0.05, max_skipped=0.2)
FILTER_SCALE = 6.0  # peaked logits: columns below the threshold for every row exist


def _filtered(world: int, start: int | None, stop: int | None, vp, filt=True) -> dict:
    """A gradient filter with a mass bound on the shard (rows [start, stop)) or the whole head."""
    from xtf_kernels.grad_filter import GradFilter

    t = inputs(torch.float32, world)
    h = (t["hidden"] * FILTER_SCALE).requires_grad_()
    w = t["weight"][start:stop].clone().requires_grad_()
    kw = {} if vp is None else {"vocab_parallel": vp}
    loss, stats = masked_ce(
        h,
        w,
        t["labels"],
        keep=t["keep"],
        grad_filter=GradFilter(**GRAD_FILTER) if filt else None,
        return_stats=True,
        backend="torch",
        **kw,
    )
    loss.backward()
    return dict(loss=loss.detach(), skipped=stats.grad_skipped, keep=stats.keep, dh=h.grad)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start, stop = SPLITS[world][rank]
        vp = VocabParallel(start, stop)
        res = {"shard": (start, stop)}
        for backend in BACKENDS:
            for name in CASES:
                res[(backend, name)] = _run(backend, name, world, start, stop, vp)
        res.update(_dtensor_runs(world))
        res["errors"] = _errors(world, rank)
        res["compile"] = _compiled(world, rank)
        res["grad_filter"] = _filtered(world, start, stop, vp)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def world_results(request) -> tuple[int, list[dict]]:
    import torch.multiprocessing as mp

    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, str(Path(tmp) / "init"), tmp), nprocs=world, join=True)
        return world, [
            torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)
        ]


def _whole(per_rank: list[dict], key, field: str) -> torch.Tensor:
    """A weight-shaped gradient reassembled from the ranks' rows (in vocabulary order)."""
    parts = sorted((r["shard"][0], r[key][field]) for r in per_rank)
    return torch.cat([p for _, p in parts])


def _reference(name: str, world: int):
    """(float64 loss, stats, [dh, dw, db]) of the unfused reference on the whole head."""
    dtype, spec = CASES[name]
    t = inputs(dtype, world)
    leaves = [t["hidden"].double().requires_grad_(), t["weight"].double().requires_grad_()]
    leaves.append(t["bias"].double().requires_grad_() if spec.get("bias") else None)
    kw = call_kwargs(spec, t, leaves[2])
    labels = t["labels"]
    pos = kw.pop("position_ids", None)
    if pos is not None:  # what masked_ce(position_ids=...) does first
        labels = mask_unpredicted(labels, check_position_ids(pos, labels), -100, True)
    loss, stats = reference_masked_ce(leaves[0], leaves[1], labels, **kw)
    up = t["upstream"].double() if loss.dim() else None
    return loss, stats, _grads(loss, leaves, up)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_equals_one_process_on_the_whole_head(world_results, backend: str, name: str) -> None:
    world, per_rank = world_results
    dtype = CASES[name][0]
    single = _run(backend, name, world, None, None, None)
    ref_loss, ref_stats, ref_grads = _reference(name, world)
    for rank, r in enumerate(per_rank):
        got = r[(backend, name)]
        msg = f"world {world} rank {rank} {backend} {name}"
        assert_close_crit(f"{msg}: loss", got["loss"], ref_loss, single["loss"], dtype)
        assert torch.equal(got["keep"], single["keep"]), msg
        for f in STATS:
            if single[f] is None:
                assert got[f] is None, f
                continue
            assert_close_crit(f"{msg}: {f}", got[f], ref_stats[f], single[f], dtype)
        assert_close_crit(f"{msg}: d_hidden", got["dh"], ref_grads[0], single["dh"], dtype)
    assert_close_crit(
        f"{name}: d_weight",
        _whole(per_rank, (backend, name), "dw"),
        ref_grads[1],
        single["dw"],
        dtype,
    )
    if ref_grads[2] is not None:
        db = _whole(per_rank, (backend, name), "db")
        assert_close_crit(f"{name}: d_bias", db, ref_grads[2], single["db"], dtype)


def test_a_shard_without_gold_labels(world_results) -> None:
    world, per_rank = world_results
    if not NO_GOLD[world]:
        pytest.skip("every shard holds a label at this world size")
    lo, hi = NO_GOLD[world]
    labels = inputs(torch.float32, world)["labels"]
    assert not ((labels >= lo) & (labels < hi)).any()
    assert any(r["shard"] == (lo, hi) for r in per_rank)


def test_nothing_kept_gives_zero_gradients(world_results) -> None:
    _, per_rank = world_results
    for r in per_rank:
        got = r[("torch", "nothing_kept")]
        assert float(got["loss"]) == 0.0
        assert not got["dh"].any() and not got["dw"].any()


def test_dtensor_weight_is_vocabulary_parallel(world_results) -> None:
    """A Shard(0) DTensor head (torch's uneven chunking; an empty shard at world 4 for the tiny
    head), a replicated DTensor hidden and a sharded bias: the single-process result."""
    world, per_rank = world_results
    t = inputs(torch.float32, world)
    for tag, vocab in (("dtensor", None), ("dtensor_tiny", 5)):
        weight, bias, labels = t["weight"], t["bias"], t["labels"]
        if vocab is not None:
            weight, bias = weight[:vocab], bias[:vocab]
            labels = torch.where(labels >= 0, labels % vocab, labels)
        h = t["hidden"].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        loss, stats = _dtensor_case_loss(h, w, b, labels, t["keep"])
        loss.backward()
        rows = [r[tag]["local_rows"] for r in per_rank]
        assert sum(rows) == w.shape[0]
        if vocab is not None and world == 4:
            assert rows == [2, 2, 1, 0]
        for r in per_rank:
            got = r[tag]
            torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                got["logprob"], stats.logprob, rtol=1e-5, atol=1e-5, equal_nan=True
            )
            torch.testing.assert_close(
                got["entropy"], stats.entropy, rtol=1e-5, atol=1e-5, equal_nan=True
            )
            torch.testing.assert_close(got["dh"], h.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["dw"], w.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["db"], b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case, kind, words",
    [
        ("overlap", "ValueError", ("vocab_parallel", "tile")),
        ("rows", "ValueError", ("weight", "rows")),
        ("replicated_weight", "ValueError", ("weight", "Shard(0)")),
        ("dim1_weight", "ValueError", ("weight", "Shard(0)")),
        ("both", "ValueError", ("vocab_parallel", "DTensor")),
        ("vocab_size", "ValueError", ("vocab_parallel", "tile")),
    ],
)
def test_refusals_name_the_argument(
    world_results, case: str, kind: str, words: tuple[str, ...]
) -> None:
    _, per_rank = world_results
    for r in per_rank:
        msg = r["errors"][case]
        assert msg is not None and msg.startswith(kind), (case, msg)
        for word in words:
            assert word in msg, (case, msg)


def test_torch_compile_runs_it_eagerly(world_results) -> None:
    """Under torch.compile the vocabulary-parallel call is a graph break (collectives and
    DTensors run eagerly), with the eager result."""
    _, per_rank = world_results
    for r in per_rank:
        (le, he, we), (lc, hc, wc) = r["compile"]["eager"], r["compile"]["compiled"]
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(hc, he)
        torch.testing.assert_close(wc, we)


def test_gradient_filter_bounds_the_mass_over_the_whole_head(world_results) -> None:
    """grad_filter on shards: the mass bound is split between the shards, grad_skipped reports
    the mass skipped over the whole head (the same on every rank), and dX stays within the
    filter's stated error bound of the exact gradient: |dx_i - exact_i| <= scale * skipped_i *
    max|W_v|."""
    world, per_rank = world_results
    exact = _filtered(world, None, None, None, filt=False)
    t = inputs(torch.float32, world)
    n_kept = int(exact["keep"].sum())
    wmax = t["weight"].abs().max()
    assert exact["skipped"] is None
    first = per_rank[0]["grad_filter"]
    kept = first["keep"]
    assert torch.equal(kept, exact["keep"])
    assert torch.isnan(first["skipped"][~kept]).all()
    sk = first["skipped"][kept]
    assert (sk >= 0).all() and (sk <= GRAD_FILTER["max_skipped"] * (1 + 1e-5)).all()
    assert sk.max() > 0, "the filter skipped nothing: the test shows nothing"
    for r in per_rank:
        got = r["grad_filter"]
        torch.testing.assert_close(got["loss"], exact["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["skipped"], first["skipped"], equal_nan=True)
        err = (got["dh"] - exact["dh"]).abs().amax(-1)[kept]
        bound = sk / n_kept * wmax + 1e-6
        assert (err <= bound).all(), (err - bound).max()
