"""xtf-kernels: fused masked cross-entropy with per-token statistics, and XTF token filtering.

Public API::

    from xtf_kernels import masked_ce, MaskedCE, TokenStats
"""

from ._version import __version__
from .backends import backend_status
from .config import Options, get_options, options, set_options
from .masked_ce import MaskedCE, MaskedCESpec, masked_ce, rowwise
from .stats import TokenStats

__all__ = [
    "MaskedCE",
    "MaskedCESpec",
    "Options",
    "TokenStats",
    "__version__",
    "backend_status",
    "get_options",
    "masked_ce",
    "options",
    "rowwise",
    "set_options",
]
