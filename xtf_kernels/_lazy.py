"""Lazy re-exports for package ``__init__`` modules (a leaf: imports only the standard library).

``import xtf_kernels`` and ``xtf --help`` must not pay for torch, transformers or peft, so the
packages re-export their public names through a module-level ``__getattr__`` (PEP 562)::

    __getattr__, __dir__ = lazy_exports(__name__, {"masked_ce": ".loss", ...})

The first access to a name imports its module and caches the value in the package's
namespace, so later accesses are ordinary attribute look-ups. Type checkers read the same
imports under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``(__getattr__, __dir__)`` pair of a package that re-exports ``table`` lazily.

    Args:
        package: the package's ``__name__`` (its module must already be in ``sys.modules``).
        table: public name -> module it comes from, relative to ``package`` (``".loss"``) or
            absolute.

    Returns:
        ``__getattr__(name)`` importing ``table[name]`` on first use (``AttributeError`` for
        other names, as for any module) and ``__dir__()`` listing the names with the module's own.
    """
    if not isinstance(package, str) or package not in sys.modules:
        raise ValueError(f"package: expected the name of an imported module, got {package!r}")
    if not isinstance(table, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in table.items()
    ):
        raise TypeError("table: expected a mapping of str names to str module paths")
    table = dict(table)

    def __getattr__(name: str) -> Any:
        where = table.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where, package), name)
        setattr(sys.modules[package], name, value)  # cached: __getattr__ is not called again
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
