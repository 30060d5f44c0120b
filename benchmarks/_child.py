"""One way for the benchmarks to run a measured case in a fresh child process.

A case runs in its own process so its peak memory (RSS on the CPU, the CUDA allocator's peak on
a GPU) and its thread count belong to it alone. The child prints one JSON object on its last
stdout line; :func:`run_child` returns it, or why there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

__all__ = ["ROOT", "run_child"]

#: The repository root: children run from here, with it on ``PYTHONPATH``.
ROOT = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str], timeout: float) -> tuple[dict | None, dict | None]:
    """Run ``cmd`` from the repository root: ``(the JSON object on its last stdout line, None)``,
    or ``(None, {"status": "timeout" | "failed", "note": why})``."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return None, {"status": "timeout", "note": f"over {timeout} s"}
    if res.returncode != 0:
        return None, {"status": "failed", "note": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    lines = res.stdout.strip().splitlines()
    if not lines:
        return None, {"status": "failed", "note": "the child printed no result"}
    try:
        return json.loads(lines[-1]), None
    except json.JSONDecodeError:
        return None, {"status": "failed", "note": f"the child's last line is not a JSON result: {lines[-1][:160]}"}
