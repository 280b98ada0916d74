"""Golden files: every plan under tests/golden/parse dumps to its .ir.txt; every plan under
tests/golden/errors renders to its .err.txt (all diagnostics, with line:col and carets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from golden_util import check_golden

from planc.compiler.cli import render
from planc.compiler.irdump import dump_ir
from planc.compiler.validate import check_file

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PARSE_CASES = sorted((GOLDEN / "parse").glob("*.plan"))
ERROR_CASES = sorted((GOLDEN / "errors").glob("*.plan"))


@pytest.fixture(autouse=True)
def _relative_paths(monkeypatch):
    """Diagnostics name files as given; run from the golden root so names are stable."""
    monkeypatch.chdir(GOLDEN)


@pytest.mark.parametrize("plan", PARSE_CASES, ids=lambda p: p.stem)
def test_parse_golden(plan: Path) -> None:
    checked = check_file(os.path.relpath(plan, GOLDEN))
    assert checked.ok, render(checked.diagnostics, checked.sources)
    check_golden(dump_ir(checked.plan), plan.with_suffix(".ir.txt"))


@pytest.mark.parametrize("plan", ERROR_CASES, ids=lambda p: p.stem)
def test_error_golden(plan: Path) -> None:
    checked = check_file(os.path.relpath(plan, GOLDEN))
    assert not checked.ok
    errors = [d for d in checked.diagnostics if d.severity == "error"]
    assert errors and all(d.span.line >= 1 and d.span.col >= 1 for d in errors)
    check_golden(render(checked.diagnostics, checked.sources) + "\n", plan.with_suffix(".err.txt"))


def test_three_unrelated_mistakes_are_all_reported() -> None:
    checked = check_file("errors/three_mistakes.plan")
    errors = [d for d in checked.diagnostics if d.severity == "error"]
    assert [(d.span.line, d.span.col) for d in errors] == [(3, 38), (4, 30), (6, 31)]
    rendered = render(errors, checked.sources)
    assert rendered.count("^") >= 3 + len("sparsty") - 1
    assert "did you mean 'sparsity'?" in rendered
