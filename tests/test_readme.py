"""The README's excerpts of example plans are the files themselves (minus their opening comments)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: A fenced block whose first line names a plan file: ```\n# examples/x.plan\n...```
EXCERPT = re.compile(r"```\n# ((?:examples|bench)/[\w/.-]+\.plan)\n(.*?)```", re.S)


def plan_body(path: Path) -> str:
    """The plan without the comment block it opens with."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


EXCERPTS = EXCERPT.findall(README)


def test_the_readme_quotes_at_least_the_main_example():
    assert "examples/minilm_int8.plan" in [name for name, _ in EXCERPTS]


@pytest.mark.parametrize("name,quoted", EXCERPTS, ids=[name for name, _ in EXCERPTS])
def test_readme_excerpt_matches_the_file(name, quoted):
    assert quoted == plan_body(ROOT / name), f"README's copy of {name} is stale: paste the file again"
