"""`prune { method = layers, keep = [...] }`: the fx pass and the training runtime's eager drop agree."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from planc.backends.train import planc_runtime as rt
from distill_helpers import capture, embeddings, keep_layers
from planc.passes.base import PassContext, PassError
from planc.passes.graph_utils import module_stack
from planc.passes.manager import PassManager
from planc.passes.prune import Prune
from planc.passes.registry import load_pass
from planc.passes.quantize import Quantize
from planc.passes.quantize.rtn import QuantizePass


def linears(model: torch.nn.Module) -> frozenset[str]:
    return frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def drop(gm, model, inputs, keep, targets=None):
    ctx = PassContext(model=model, example_inputs=inputs, targets=targets or linears(model), source="t.plan:1:1")
    return PassManager().run(gm, [(load_pass(Prune(method="layers", keep=keep)), ctx)])


@pytest.mark.parametrize("keep", [[1, 3, 5], [0, 5], [2]])
def test_graph_equals_eager_with_the_same_layers_dropped(minilm, keep):
    model, tokenizer, inputs, gm = minilm
    out, (record,) = drop(gm, model, inputs, keep)
    reference = keep_layers(model, keep)
    dropped = [i for i in range(6) if i not in keep]
    assert record.details["dropped"] == dropped and record.details["kept"] == keep
    per_layer = sum(p.numel() for p in model.encoder.layer[0].parameters())
    assert record.before.params - record.after.params == len(dropped) * per_layer
    # No node or weight of a dropped block is left.
    for node in out.graph.nodes:
        paths = [p for p, _ in module_stack(node)] + [str(node.target)]
        assert not any(p.startswith(f"encoder.layer.{i}.") or p == f"encoder.layer.{i}" for p in paths for i in dropped)
    # Same numbers as eager with those blocks removed, at other batch and sequence sizes.
    for texts in (["A short one."], ["Two sentences of rather different lengths here, to pad.", "Hi!", "Yes."]):
        sample = {k: v for k, v in tokenizer(texts, padding=True, return_tensors="pt").items() if k != "token_type_ids"}
        with torch.no_grad():
            got, want = out(**sample), reference(**sample)
        torch.testing.assert_close(got["last_hidden_state"], want.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["pooler_output"], want.pooler_output, rtol=1e-5, atol=1e-5)


def test_selection_limits_the_dropped_blocks(minilm):
    model, _, inputs, gm = minilm
    inside = frozenset(n for n in linears(model) if n.startswith(("encoder.layer.3.", "encoder.layer.4.")))
    _, (record,) = drop(gm, model, inputs, [4], targets=inside)
    assert record.details["dropped"] == [3]


def test_then_channels_and_int8_still_run(minilm):
    model, tokenizer, inputs, gm = minilm
    mlps = frozenset(n for n, m in model.named_modules() if type(m).__name__ == "BertIntermediate")
    ctx = lambda targets: PassContext(model=model, example_inputs=inputs, targets=targets, source="t.plan:1:1")  # noqa: E731
    encoder = frozenset(n for n in linears(model) if not n.startswith("pooler"))
    out, records = PassManager().run(gm, [
        (load_pass(Prune(method="layers", keep=[1, 3, 5])), ctx(linears(model))),
        (load_pass(Prune(method="channels", sparsity=0.5)), ctx(mlps)),
        (QuantizePass(Quantize()), ctx(encoder)),
    ])
    assert len(records[1].details["groups"]) == 3  # only the kept blocks' MLPs are left to prune
    with torch.no_grad():
        got = embeddings(out(**inputs), inputs["attention_mask"])
    assert got.shape == (4, 384) and torch.isfinite(got).all()


def test_errors_are_actionable(minilm):
    model, _, inputs, gm = minilm
    with pytest.raises(PassError, match="names block"):
        drop(gm, model, inputs, [1, 6])
    with pytest.raises(PassError, match="nothing to remove"):
        drop(gm, model, inputs, [0, 1, 2, 3, 4, 5])
    with pytest.raises(PassError, match="no repeated blocks"):
        drop(gm, model, inputs, [0], targets=frozenset({"pooler.dense"}))


def test_options_are_checked_without_torch_models():
    assert Prune(method="layers", keep=[1, 3, 5]).keep == [1, 3, 5]
    for bad, message in [
        ({"method": "layers"}, "needs the blocks to keep"),
        ({"method": "layers", "keep": [1, 1]}, "each once"),
        ({"method": "layers", "keep": [-1]}, ">= 0"),
        ({"method": "heads", "keep": [1]}, "belongs to method = layers"),
        ({"method": "layers", "keep": [1], "schedule": "gradual"}, "oneshot"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Prune(**bad)


def test_runtime_drop_matches_the_pass_and_saves_original_layout(minilm):
    """Training drops blocks eagerly; its saved weights load into the original model, and the
    pass then removes exactly those blocks: the compiled graph computes the trained student."""
    model, tokenizer, inputs, _ = minilm
    student = copy.deepcopy(model)
    shrink = rt.Shrink()
    removed = rt.drop_blocks(student, sorted(linears(model)), shrink, keep=[1, 3, 5])
    assert removed == 3 and len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    with torch.no_grad():  # "training": the kept blocks change
        for p in student.encoder.layer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dense = rt.dense_state_dict({k: v.clone() for k, v in student.state_dict().items()}, shrink)
    restored = copy.deepcopy(model)
    restored.load_state_dict(dense, strict=True)  # every original key, original shapes
    torch.testing.assert_close(restored.encoder.layer[0].attention.self.query.weight,
                               model.encoder.layer[0].attention.self.query.weight)  # removed: as before
    torch.testing.assert_close(restored.encoder.layer[3].output.dense.weight, student.encoder.layer[1].output.dense.weight)
    out, _ = drop(capture(restored, inputs), restored, inputs, [1, 3, 5])
    with torch.no_grad():
        torch.testing.assert_close(out(**inputs)["last_hidden_state"], student(**inputs).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
