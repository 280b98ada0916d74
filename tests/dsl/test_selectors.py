"""Selector resolution against a module table (no torch): the algebra and the empty-match rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from planc.compiler.selectors import layer_index, resolve, step_targets
from planc.compiler.validate import check_file

TABLE = [
    ("", "GPT"),
    ("tok_emb", "Embedding"),
    *[(f"blocks.{i}{suffix}", kind) for i in range(4) for suffix, kind in (
        ("", "Block"), (".ln_1", "LayerNorm"), (".attn", "Attention"), (".attn.q_proj", "Linear"),
        (".attn.out_proj", "Linear"), (".mlp.fc_in", "Linear"), (".mlp.fc_out", "Linear"))],
    ("lm_head", "Linear"),
]


def plan_with(tmp_path: Path, selects: str, step: str):
    path = tmp_path / "p.plan"
    path.write_text(f'model m = factory("pkg.mod:f")\n{selects}\npipeline {{ {step} }}\n')
    checked = check_file(path)
    assert checked.ok, [d.message for d in checked.diagnostics]
    return checked.plan


def test_layer_index() -> None:
    assert layer_index("encoder.layer.3.attention.self.query") == 3
    assert layer_index("blocks.11") == 11
    assert layer_index("lm_head") is None


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("Linear & layers(1..2) & name(\"*.mlp.*\")", {"blocks.1.mlp.fc_in", "blocks.1.mlp.fc_out", "blocks.2.mlp.fc_in", "blocks.2.mlp.fc_out"}),
        ("Linear - layers(0..3)", {"lm_head"}),
        ("Embedding | name(\"lm_head\")", {"tok_emb", "lm_head"}),
        ("regex(\"blocks\\\\.[02]\\\\.attn\\\\.q_proj\")", {"blocks.0.attn.q_proj", "blocks.2.attn.q_proj"}),
        ("Linear & layers(3) - name(\"*.out_proj\") | Embedding", {"blocks.3.attn.q_proj", "blocks.3.mlp.fc_in", "blocks.3.mlp.fc_out", "tok_emb"}),
        ("Linear & (layers(3) - name(\"*.out_proj\") | Embedding)", {"blocks.3.attn.q_proj", "blocks.3.mlp.fc_in", "blocks.3.mlp.fc_out"}),
    ],
)
def test_selector_algebra(tmp_path: Path, expr: str, expected: set[str]) -> None:
    plan = plan_with(tmp_path, f"select s = {expr}", "prune s;")
    assert resolve(plan.pipeline[0].selector, TABLE, plan.selectors) == expected


def test_default_targets_and_empty_matches(tmp_path: Path) -> None:
    plan = plan_with(tmp_path, 'select none = name("encoder.*")\nselect? maybe = LayerNorm & Embedding',
                     "prune; prune none; prune maybe; cast;")
    linear = {path for path, kind in TABLE if kind == "Linear"}
    assert step_targets(plan.pipeline[0], TABLE, plan) == (linear, [])
    targets, problems = step_targets(plan.pipeline[1], TABLE, plan)
    assert not targets and problems[0].severity == "error" and problems[0].span.line == 4
    assert "matches no module" in problems[0].message and ":2:1" in problems[0].notes[0]
    targets, problems = step_targets(plan.pipeline[2], TABLE, plan)
    assert not targets and problems[0].severity == "warning"
    assert step_targets(plan.pipeline[3], TABLE, plan)[0] == {path for path, _ in TABLE}
