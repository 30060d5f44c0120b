"""What ``xtf score`` accepts on its command line and in ``--model`` (issue 17, items 3, 6, 10)."""

from __future__ import annotations

import pytest

from xtf_kernels.cli import build_parser

SCORE = ["score", "--model", "m", "--data", "d.jsonl", "--out", "o"]


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--protect", "2", "202"], [2, 202]),  # the README's form
        (["--protect", "2,202"], [2, 202]),
        (["--protect", "2", "--protect", "5,6"], [2, 5, 6]),
        ([], None),
    ],
)
def test_protect_takes_spaces_or_commas(flags, want):
    assert build_parser(with_demo=False).parse_args([*SCORE, *flags]).protect == want


@pytest.mark.parametrize("bad", [["--protect", "eos"], ["--protect", "-1"], ["--protect"]])
def test_protect_refuses_non_ids(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser(with_demo=False).parse_args([*SCORE, *bad])
    assert "--protect" in capsys.readouterr().err


def test_readme_protect_example_parses():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    examples = re.findall(r"`--protect ([^`]*)`", readme)
    assert examples
    for ex in examples:
        assert build_parser(with_demo=False).parse_args([*SCORE, "--protect", *ex.split()]).protect
