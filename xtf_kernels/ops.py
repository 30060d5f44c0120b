"""Re-export of the masked_ce API (its home is the :mod:`xtf_kernels.loss` package).

Kept because the README and the docs cite ``xtf_kernels.ops``: ``from xtf_kernels.ops import
masked_ce, MaskedCE, MaskedCESpec, rowwise`` keeps working.
"""

from __future__ import annotations

from .loss import MaskedCE, MaskedCEOutputs, MaskedCESpec, SelectFn, masked_ce, rowwise

__all__ = ["MaskedCE", "MaskedCEOutputs", "MaskedCESpec", "SelectFn", "masked_ce", "rowwise"]
