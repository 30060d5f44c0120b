"""Fixtures shared by the XTF framework tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny random-init Llama (``tests._tiny``), built once per test module."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("m"))
