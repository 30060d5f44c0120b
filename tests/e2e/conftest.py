"""End-to-end runs (the CLI, the demo, the benchmark scripts as subprocesses): marked ``slow``.

CI runs them with everything else; ``pytest -m "not slow"`` skips them for a quick local loop.
"""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
