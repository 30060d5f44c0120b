"""Packaging: the extras are decided once, and the README's main job installs what it runs."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parent.parent


def _setup_kwargs(monkeypatch) -> dict:
    got: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return got


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_extras(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    extras = kw["extras_require"]
    assert set(extras) == {"xtf", "trl", "bench", "test"}
    xtf = _names(extras["xtf"])
    # the command line, the demo, the HF Trainer integration (accelerate) and LoRA (peft)
    assert {"transformers", "tokenizers", "pyarrow", "matplotlib", "datasets", "accelerate", "peft"} <= xtf
    assert xtf <= _names(extras["trl"]) and xtf <= _names(extras["test"])
    assert "trl" in _names(extras["trl"]) and {"pytest", "hypothesis"} <= _names(extras["test"])
    assert kw["entry_points"]["console_scripts"] == ["xtf=xtf_kernels.cli:main"]


def test_readme_documents_the_extras(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    assert 'pip install "torch==2.13.0" -e ".[xtf]" && xtf demo' in readme
    for extra in _setup_kwargs(monkeypatch)["extras_require"]:
        assert f"| `{extra}` |" in readme, extra


def test_version_and_changelog():
    ns: dict = {}
    exec((ROOT / "xtf_kernels" / "_version.py").read_text(), ns)
    assert re.fullmatch(r"\d+\.\d+\.\d+", ns["__version__"])
    log = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in log
    unreleased = log.split("## [Unreleased]")[1].split("\n## ")[0]
    assert f"`{ns['__version__']}`" in unreleased  # the bump is recorded with the changes it covers


def test_readme_setup_is_two_commands_and_says_how_to_get_the_cpu_build():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    commands = [ln for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2 and all(c.startswith('pip install "torch==2.13.0" -e ') for c in commands)
    # the CPU wheel index is added, never made the only index (PyPI still serves the rest)
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in setup
    assert "--extra-index-url" in setup
    assert "--index-url https://download.pytorch.org" not in setup
