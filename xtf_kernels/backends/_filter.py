"""Gradient filtering inside the driver: which columns of a block of gradient logits the dX / dW
GEMMs skip, and those GEMMs on what is kept (the rule is :mod:`xtf_kernels.grad_filter`).

A block is ``g`` ``[r, C]``: the unit-upstream gradient logits of ``r`` rows over ``C``
vocabulary columns. Column ``v`` is skipped for a set of rows when every ``|g_iv|`` of those rows
is below the threshold (cut-cross-entropy's rule, with a column as the block: the kept columns
are gathered, so no vocabulary order is needed). With a mass bound, a row whose skipped mass
``sum_{v skipped} |g_iv|`` would exceed it is *heavy*: it takes the dense GEMMs and skips
nothing, and the columns are chosen over the other (*light*) rows only, until every light row is
within the bound.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._gemm import acc_mm

#: above this share of kept columns the dense GEMMs are used (gathering would cost more)
DENSE_SHARE = 0.5
#: rounds of moving rows over the bound to the dense side before giving up (all dense)
MAX_ROUNDS = 8


class BlockPlan(NamedTuple):
    """What the GEMMs of one block of gradient logits do."""

    cols: torch.Tensor | None  #: int64 kept columns of the light rows; None: all rows dense
    light: torch.Tensor | None  #: int64 rows that skip the other columns (None: every row)
    heavy: torch.Tensor | None  #: int64 rows that take the dense GEMMs (None: none)
    skipped: torch.Tensor  #: fp32 [r] |g| mass skipped per row


def _skipped_mass(a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """fp32 ``[r]``: the mass of ``a`` (``|g|``) in the columns ``skip`` (bool ``[C]``)."""
    out = torch.empty(a.shape[0], 1, dtype=torch.float32, device=a.device)
    acc_mm(out, a, skip.to(a.dtype).unsqueeze(1), accumulate=False)
    return out.squeeze(1)


def plan_block(g: torch.Tensor, threshold: float, max_skipped: float | None) -> BlockPlan:
    """The :class:`BlockPlan` of ``g`` ``[r, C]`` under ``threshold`` and the per-row bound."""
    r, C = g.shape
    dense = BlockPlan(None, None, None, torch.zeros(r, dtype=torch.float32, device=g.device))
    if r == 0 or C == 0:
        return dense
    a = g.abs()
    light = torch.arange(r, device=g.device)
    for _ in range(MAX_ROUNDS):
        colmax = (a.index_select(0, light) if light.numel() < r else a).amax(0)
        keep = (colmax >= threshold) | torch.isnan(colmax)  # a NaN column is kept: it propagates
        mass = _skipped_mass(a, ~keep)
        ok = mass <= max_skipped if max_skipped is not None else torch.ones_like(mass, dtype=torch.bool)
        new_light = ok.nonzero().squeeze(1)
        if torch.equal(new_light, light) or new_light.numel() == 0:
            break
        light = new_light
    else:
        return dense
    if new_light.numel() == 0 or int(keep.sum()) > DENSE_SHARE * C:
        return dense
    heavy = (~ok).nonzero().squeeze(1)
    skipped = torch.where(ok, mass, torch.zeros((), device=g.device))
    return BlockPlan(keep.nonzero().squeeze(1), None if light.numel() == r else light,
                     heavy if heavy.numel() else None, skipped)


def _dx_rows(dx: torch.Tensor, g: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None, accumulate: bool,
             row_scale: torch.Tensor | None) -> None:
    """``dx[rows] (+)= (g @ w) * row_scale[rows]`` (``g`` holds just those rows; None: all)."""
    if rows is None and row_scale is None:
        acc_mm(dx, g, w, accumulate=accumulate)
        return
    part = torch.empty(g.shape[0], dx.shape[1], dtype=dx.dtype, device=dx.device)
    acc_mm(part, g, w, accumulate=False)
    if row_scale is not None:
        part.mul_((row_scale if rows is None else row_scale.index_select(0, rows)).to(part.dtype).unsqueeze(1))
    if rows is None:
        if accumulate:
            dx += part
        else:
            dx.copy_(part)
    elif accumulate:
        dx.index_add_(0, rows, part)
    else:
        dx.index_copy_(0, rows, part)


def filtered_gemms(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor, *,
                   acc_dx: bool, acc_dw: bool, rule: tuple[float, float | None],
                   row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dx (+)= (g @ w) * row_scale`` and ``dw (+)= g^T @ (x * row_scale)`` for the unit-upstream
    gradient logits ``g`` ``[r, C]`` with the columns that ``rule`` = ``(threshold,
    max_skipped)`` lets go skipped (:func:`plan_block`); ``w`` ``[C, D]`` is the block's weight
    rows, ``dw`` its ``[C, D]`` gradient. Returns the fp32 ``[r]`` |g| mass skipped per row."""
    plan = plan_block(g, *rule)
    xs = x if row_scale is None else x * row_scale.to(x.dtype).unsqueeze(1)
    if plan.cols is None:
        _dx_rows(dx, g, w, None, acc_dx, row_scale)
        acc_mm(dw, g.t(), xs, accumulate=acc_dw)
        return plan.skipped
    if plan.heavy is not None and not acc_dx:
        dx.zero_()  # rows are written in two parts below
    gl = g if plan.light is None else g.index_select(0, plan.light)
    gl = gl.index_select(1, plan.cols)
    xl = xs if plan.light is None else xs.index_select(0, plan.light)
    _dx_rows(dx, gl, w.index_select(0, plan.cols), plan.light, acc_dx or plan.heavy is not None, row_scale)
    part = torch.empty(plan.cols.numel(), dw.shape[1], dtype=dw.dtype, device=dw.device)
    acc_mm(part, gl.t(), xl, accumulate=False)
    if not acc_dw:
        dw.zero_()
    dw.index_add_(0, plan.cols, part)
    if plan.heavy is not None:  # rows over the bound: dense, nothing skipped
        gh = g.index_select(0, plan.heavy)
        _dx_rows(dx, gh, w, plan.heavy, True, row_scale)
        acc_mm(dw, gh.t(), xs.index_select(0, plan.heavy), accumulate=True)
    return plan.skipped


def grad_gemms(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor, *,
               acc_dx: bool, acc_dw: bool, rule: tuple[float, float | None] | None,
               row_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """The dX / dW GEMMs of a block of gradient logits ``g``: dense (``dx (+)= g @ w``, ``dw (+)=
    g^T @ x``; ``rule`` None, any scale already in ``g``, returns None) or
    :func:`filtered_gemms` (returns the mass skipped per row)."""
    if rule is None:
        acc_mm(dx, g, w, accumulate=acc_dx)
        acc_mm(dw, g.t(), x, accumulate=acc_dw)
        return None
    return filtered_gemms(g, x, w, dx, dw, acc_dx=acc_dx, acc_dw=acc_dw, rule=rule, row_scale=row_scale)
