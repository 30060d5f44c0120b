"""The ``slow`` tier (issue 17, item 14): registered, and its lists in tests/conftest.py name
tests that exist (a renamed module or test would otherwise silently rejoin the quick loop)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests import conftest

ROOT = Path(__file__).resolve().parent.parent


def test_slow_marker_is_registered():
    toml = (ROOT / "pyproject.toml").read_text()
    markers = re.search(r"^markers = \[(.*?)^\]", toml, flags=re.S | re.M)
    assert markers and re.search(r'^\s*"slow: ', markers.group(1), flags=re.M)


def test_slow_lists_name_existing_tests():
    for module in conftest.SLOW_MODULES | conftest.SLOW_WITHOUT_CUDA_MODULES:
        assert (ROOT / module).is_file(), module
    for nodeid in conftest.SLOW_TESTS:
        module, _, name = nodeid.partition("::")
        tree = ast.parse((ROOT / module).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        assert name.split("::")[-1] in names, nodeid
