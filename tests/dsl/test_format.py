"""`planc fmt` is canonical, idempotent, and keeps the meaning: parse(fmt(x)) == parse(x)."""

from __future__ import annotations

from pathlib import Path

import pytest

from planc.compiler.cli import main
from planc.compiler.explain import explain
from planc.compiler.validate import check_file
ROOT = Path(__file__).resolve().parents[2]
from planc.dsl.format import format_document
from planc.dsl.parser import parse

GOLDEN = ROOT / "tests" / "golden" / "parse"
PLANS = sorted((ROOT / "examples").glob("*.plan")) + sorted(GOLDEN.glob("*.plan"))


def strip_spans(value):
    """A model_dump without spans or file locations, to compare plans from different files."""
    if isinstance(value, dict):
        return {k: strip_spans(v) for k, v in value.items() if k not in ("span", "option_spans", "base_dir")}
    if isinstance(value, (list, tuple)):
        return [strip_spans(v) for v in value]
    return value


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.stem)
def test_format_round_trip(plan: Path) -> None:
    document = parse(plan.read_text(), str(plan))
    formatted = format_document(document)
    again = parse(formatted, str(plan))
    assert again == document
    assert format_document(again) == formatted
    assert [c.text for c in again.comments] == [c.text for c in document.comments]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.stem)
def test_explain_is_a_plan_with_the_same_meaning(plan: Path, tmp_path: Path) -> None:
    checked = check_file(plan)
    assert checked.ok, [d.message for d in checked.diagnostics]  # every example and golden plan validates
    resolved = tmp_path / plan.name
    resolved.write_text(explain(checked.plan))
    for extra in ("data", "models"):  # relative paths must keep resolving
        if (plan.parent / extra).exists():
            (tmp_path / extra).symlink_to(plan.parent / extra)
    again = check_file(resolved)
    assert again.ok, [d.message for d in again.diagnostics]
    assert strip_spans(again.plan.model_dump()) == strip_spans(checked.plan.model_dump())


def test_examples_are_formatted() -> None:
    examples = [str(p) for p in sorted((ROOT / "examples").glob("*.plan"))]
    assert main(["fmt", "--check", *examples]) == 0


def test_fmt_rewrites_in_place(tmp_path: Path) -> None:
    plan = tmp_path / "messy.plan"
    plan.write_text('model m=factory("a.b:c"){task=causal_lm}\npipeline{prune Linear{sparsity=50%}   # keep\n}\n')
    assert main(["fmt", "--check", str(plan)]) == 1
    assert main(["fmt", str(plan)]) == 0
    assert plan.read_text() == (
        'model m = factory("a.b:c") { task = causal_lm }\n\n'
        "pipeline {\n  prune Linear { sparsity = 50% }  # keep\n}\n"
    )
    assert main(["fmt", "--check", str(plan)]) == 0
