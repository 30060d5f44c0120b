"""The gradient-filter report of a filtered xtf case (``xtf-<backend>+gf-...``, issue 20).

One extra forward + backward with ``return_stats=True`` gives ``TokenStats.grad_skipped`` (the
|d loss / d logit| mass skipped per kept token) and, through a counting wrapper around the
driver's :func:`xtf_kernels.backends._filter.plan_block`, the share of the dX / dW GEMM work
(rows x vocabulary columns) that was skipped and the share of rows over the mass bound (they
take the dense GEMMs). One unfiltered run of the same call (cached per shape and scenario)
gives the relative error of dX and dW: ``||g_filtered - g_exact||_F / ||g_exact||_F``.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _count_plans(tally: dict):
    """Count, for every block the driver filters, the GEMM work done and its dense size."""
    from xtf_kernels.backends import _filter

    orig = _filter.plan_block

    def counting(g, threshold, max_skipped):
        plan = orig(g, threshold, max_skipped)
        r, C = g.shape
        tally["work"] += r * C
        tally["rows"] += r
        if plan.cols is None:
            tally["done"] += r * C
            tally["dense_rows"] += r
        else:
            nh = 0 if plan.heavy is None else int(plan.heavy.numel())
            tally["done"] += (r - nh) * int(plan.cols.numel()) + nh * C
            tally["dense_rows"] += nh
        return plan

    _filter.plan_block = counting
    try:
        yield tally
    finally:
        _filter.plan_block = orig


def _grads(h, w, y, kw: dict):
    """(dX, dW, stats) of one ``masked_ce`` call with statistics."""
    from xtf_kernels import masked_ce

    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    loss, st = masked_ce(hh, ww, y, **{**kw, "return_stats": True})
    loss.backward()
    return hh.grad, ww.grad, st


def _rel_err(a, b, chunk: int = 8192) -> float:
    """``||a - b||_F / ||b||_F`` in fp32, by row chunks (dW is [V, D])."""
    num = den = 0.0
    for s in range(0, b.shape[0], chunk):
        bb = b[s:s + chunk].float()
        num += float((a[s:s + chunk].float() - bb).pow(2).sum())
        den += float(bb.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


def filter_report(inputs: dict, key: tuple, cache: dict) -> dict:
    """The report of a filtered case built by :func:`.cases.build` (``inputs["kw"]`` holds its
    call's options): ``skipped_mean`` / ``skipped_max`` (mass per kept token), ``work_skipped``
    and ``dense_rows`` (shares), ``dx_rel_err`` / ``dw_rel_err`` against the unfiltered call.
    ``cache`` keeps the unfiltered gradients per ``key`` (shape, scenario)."""
    import torch

    h, w, y, kw = inputs["h"], inputs["w"], inputs["y"], inputs["kw"]
    if key not in cache:
        dx0, dw0, _ = _grads(h, w, y, {**kw, "grad_filter": None})
        cache.clear()  # one reference at a time: dW is as large as the head
        cache[key] = (dx0, dw0)
    dx0, dw0 = cache[key]
    tally = {"work": 0, "done": 0, "rows": 0, "dense_rows": 0}
    with _count_plans(tally):
        dx, dw, st = _grads(h, w, y, kw)
    sk = st.grad_skipped
    sk = sk[~torch.isnan(sk)] if sk is not None else torch.zeros(0)
    return {
        "skipped_mean": float(sk.mean()) if sk.numel() else 0.0,
        "skipped_max": float(sk.max()) if sk.numel() else 0.0,
        # NaN when no block went through the driver's filter (a backend with its own path)
        "work_skipped": 1.0 - tally["done"] / tally["work"] if tally["work"] else float("nan"),
        "dense_rows": tally["dense_rows"] / tally["rows"] if tally["rows"] else float("nan"),
        "dx_rel_err": _rel_err(dx, dx0),
        "dw_rel_err": _rel_err(dw, dw0),
    }


def describe(rep: dict) -> str:
    """One line for the CSV and the table."""
    return (f"skipped mass/token mean {rep['skipped_mean']:.2e} max {rep['skipped_max']:.2e}; "
            f"GEMM work skipped {100 * rep['work_skipped']:.1f}%; dense rows {100 * rep['dense_rows']:.0f}%; "
            f"dX rel err {rep['dx_rel_err']:.1e}; dW rel err {rep['dw_rel_err']:.1e}")
