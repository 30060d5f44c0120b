"""The repository is ruff-clean (the config lives in pyproject.toml)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.prefix) / "bin" / "ruff").exists(),
                    reason="ruff is not installed (pip install -e .[test])")
def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a shell snippet, as shlex tokens: comments dropped, lines and
    ``&&`` / ``;`` chains split."""
    out = []
    for line in script.splitlines():
        tokens = shlex.split(line, comments=True)
        cmd: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    return out


def readme_test_command(readme: str) -> list[list[str]]:
    """The commands of the README's fenced ``bash`` block that runs the test suite."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    blocks = [b for b in blocks if "pytest" in b]
    found = [b for b in blocks if any(c[:3] == ["python", "-m", "pytest"] for c in _commands(b))]
    assert len(found) == 1, f"expected one README block that runs pytest, found {len(found)}"
    return _commands(found[0])


def ci_runs(readme_cmds: list[list[str]], ci_script: str) -> bool:
    """Whether the CI script runs every README command, in order, under ``set -e``."""
    ci = _commands(ci_script)
    strict = any(c[:1] == ["set"] and any(t.startswith("-") and "e" in t for t in c[1:]) for c in ci)
    it = iter(ci)
    return strict and all(any(c == want for c in it) for want in readme_cmds)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = readme_test_command(readme)
    assert any(c[:3] == ["python", "-m", "pytest"] and "tests" in c for c in cmds)
    assert ci_runs(cmds, ci), f".ci/run does not run the README's test command {cmds}"


def test_ci_check_can_fail():
    cmds = [["pip", "install", "-e", ".[test]"], ["python", "-m", "pytest", "-q", "tests"]]
    assert ci_runs(cmds, "set -euo pipefail\npip install -e '.[test]' && python -m pytest -q tests\n")
    assert ci_runs(cmds, "set -e\npip install -e .[test]\n# x\npython -m pytest -q tests  # all\n")
    assert not ci_runs(cmds, "pip install -e .[test] && python -m pytest -q tests\n")  # no set -e
    assert not ci_runs(cmds, "set -e\npip install -e .[test] && python -m pytest -q tests/test_lint.py\n")
    assert not ci_runs(cmds, "set -e\npython -m pytest -q tests\npip install -e .[test]\n")
    assert not ci_runs(cmds, "set -e\n# pip install -e .[test] && python -m pytest -q tests\n")
