"""xtf-kernels: fused masked cross-entropy with per-token statistics, and XTF token filtering.

Public API::

    from xtf_kernels import masked_ce, MaskedCE, TokenStats

The names below are imported on first use (``import xtf_kernels`` does not import torch).
``xtf_kernels.masked_ce`` is the function; its implementation is the package
:mod:`xtf_kernels.loss` (``from xtf_kernels.loss import core, validate``).
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__

_EXPORTS = {
    "MaskedCE": ".loss",
    "MaskedCESpec": ".loss",
    "masked_ce": ".loss",
    "rowwise": ".loss",
    "VocabParallel": ".loss",
    "Options": ".config",
    "get_options": ".config",
    "options": ".config",
    "set_options": ".config",
    "TokenStats": ".stats",
    "backend_status": ".backends",
    "GradFilter": ".grad_filter",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .backends import backend_status
    from .config import Options, get_options, options, set_options
    from .grad_filter import GradFilter
    from .loss import MaskedCE, MaskedCESpec, VocabParallel, masked_ce, rowwise
    from .stats import TokenStats

__all__ = [
    "GradFilter",
    "MaskedCE",
    "MaskedCESpec",
    "Options",
    "TokenStats",
    "VocabParallel",
    "__version__",
    "backend_status",
    "get_options",
    "masked_ce",
    "options",
    "rowwise",
    "set_options",
]
