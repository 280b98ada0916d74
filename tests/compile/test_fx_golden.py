"""Golden graphs: `--emit fx-after:PASS` of a one-pass plan on a tiny example GPT, per pass.

A change to what a pass writes into the graph shows up here as a readable diff of generated
code (`UPDATE_GOLDEN=1` accepts it). Numerics are tested elsewhere, against the eager model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from golden_util import check_golden

from planc.compiler.driver import compile_plan
from planc.compiler.validate import load_plan

CASES = sorted((Path(__file__).resolve().parents[1] / "golden" / "fx").glob("*.plan"))


@pytest.mark.parametrize("plan", CASES, ids=lambda p: p.stem)
def test_graph_after_the_pass(plan: Path) -> None:
    last = load_plan(plan)[0].pipeline[-1].name
    result = compile_plan(plan, emit=f"fx-after:{last}")
    assert result.text and "def forward" in result.text
    check_golden(result.text, plan.with_suffix(".fx.txt"))


def test_every_pass_has_a_golden_graph() -> None:
    from planc.passes.options import pass_options

    covered = {load_plan(plan)[0].pipeline[-1].name for plan in CASES}
    assert covered == set(pass_options())
