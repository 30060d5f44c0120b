"""Gradient filtering: which vocabulary columns the dX / dW GEMMs may skip (a leaf module).

The gradient of a row's loss with respect to its logits is ``g_v = p_v (1 + 2 zl lse) - ls / V
- (1 - ls) [v == y]`` (``p`` the softmax): after training most ``p_v`` are tiny, and the columns
where every row of a group has a negligible ``|g_v|`` contribute almost nothing to ``dX = G W``
and ``dW = G^T X``. :class:`GradFilter` says how small is negligible:

* ``threshold``: a column of a row group is a candidate when every ``|g_v|`` in it is below
  this (``"auto"``: the input dtype's machine epsilon / 32, cut-cross-entropy's ``filter_eps``);
* ``max_skipped``: None (the default: no bound, the threshold alone as in cut-cross-entropy) or
  the largest |gradient-logit| mass skipped in any row (``"auto"``: the input dtype's epsilon).
  A row whose skipped mass would exceed it takes the dense GEMMs (nothing skipped for it) and
  the columns are chosen over the other rows; the speed then depends on how many rows have
  light tails.

The skipped mass ``S_i = sum_{v skipped} |g_iv|`` bounds the error: ``|dx_i - exact| <= S_i
max_v |W_v|`` (the norm of a weight row), and each skipped ``dW_v`` misses at most
``sum_i |g_iv| |x_i|``. The loss and every statistic stay exact; ``masked_ce(...,
return_stats=True)`` reports ``S_i`` per kept token (``TokenStats.grad_skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GradFilter:
    """How the backward may skip negligible vocabulary columns (module doc).

    Attributes:
        threshold: ``"auto"`` (``torch.finfo(dtype).eps / 32`` of the inputs' dtype) or a
            float ``>= 0`` compared with ``|d loss / d logit|`` (unit upstream gradient).
        max_skipped: None (no bound, the default), ``"auto"`` (``torch.finfo(dtype).eps``) or
            a float ``>= 0``: the largest |gradient-logit| mass skipped in any row.
    """

    threshold: float | str = "auto"
    max_skipped: float | str | None = None

    def __post_init__(self) -> None:
        for name in ("threshold", "max_skipped"):
            v = getattr(self, name)
            if v is None and name == "max_skipped":
                continue
            if isinstance(v, str):
                if v != "auto":
                    raise ValueError(f"GradFilter.{name}: expected 'auto' or a float >= 0, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"GradFilter.{name}: expected 'auto' or a finite float >= 0, got {v!r}")

    def resolve(self, dtype: torch.dtype) -> tuple[float, float | None] | None:
        """``(threshold, max_skipped)`` as numbers for inputs of ``dtype``; None when the
        threshold is 0 (nothing can be skipped: the exact path)."""
        eps = torch.finfo(dtype).eps
        thr = eps / 32 if self.threshold == "auto" else float(self.threshold)
        cap = eps if self.max_skipped == "auto" else (None if self.max_skipped is None else float(self.max_skipped))
        return None if thr == 0.0 else (thr, cap)


def as_grad_filter(value: object, name: str = "grad_filter") -> GradFilter | None:
    """The :class:`GradFilter` a ``grad_filter`` argument means: None (exact), ``"auto"``
    (``GradFilter()``: the dtype's epsilon / 32, no mass bound, cut-cross-entropy's rule), a float
    (that threshold) or a GradFilter. Raises ValueError naming ``name`` otherwise."""
    if value is None or isinstance(value, GradFilter):
        return value
    if value == "auto":
        return GradFilter()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"{name}: expected a finite threshold >= 0, got {value!r}")
        return GradFilter(threshold=float(value))
    raise ValueError(f"{name}: expected None, 'auto', a float threshold or a GradFilter, got {value!r}")
