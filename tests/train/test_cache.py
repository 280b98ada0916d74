"""The trained-weights cache key: it changes with every file that defines the starting model."""

from __future__ import annotations

from pathlib import Path

from planc.backends.train.cache import plan_key
from planc.compiler.ir import InputSpec, ModelSource
from planc.dsl.source import Span


def _model(base: Path, **args) -> ModelSource:
    span = Span("<test>", 1, 1, 1, 1)
    inputs = (InputSpec(span=span, name="input_ids", dtype="int64", dims=("batch", "seq")),)
    return ModelSource(span=span, name="gpt", kind="factory", ref="gpt.py:gpt", args=args, inputs=inputs, base_dir=base)


def test_the_key_follows_the_factory_source_and_a_checkpoint_it_names(tmp_path: Path) -> None:
    (tmp_path / "gpt.py").write_text("def gpt(**kw): ...\n")
    (tmp_path / "teacher.pt").write_bytes(b"old weights")
    model = _model(tmp_path, n_layer=2, checkpoint="teacher.pt")
    key = plan_key("plan text", model)
    assert plan_key("plan text", model) == key
    (tmp_path / "unrelated.txt").write_text("not part of the model")
    assert plan_key("plan text", model) == key

    (tmp_path / "teacher.pt").write_bytes(b"retrained weights")  # same path, new teacher
    retrained = plan_key("plan text", model)
    assert retrained != key

    (tmp_path / "gpt.py").write_text("def gpt(**kw): return None\n")
    assert plan_key("plan text", model) not in (key, retrained)
    assert plan_key("other plan", model) != plan_key("plan text", model)
