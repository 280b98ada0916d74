"""Heads and channels removed during training come back as zeros, and the plan's passes remove
exactly those again: the compiled graph computes the trained student."""

from __future__ import annotations

import copy

import torch

from planc.backends.train import planc_runtime as rt
from distill_helpers import capture
from planc.passes.base import PassContext
from planc.passes.manager import PassManager
from planc.passes.prune import Prune
from planc.passes.registry import load_pass


def of_type(model: torch.nn.Module, name: str) -> frozenset[str]:
    return frozenset(n for n, m in model.named_modules() if type(m).__name__ == name)


def test_bert_heads_and_channels_round_trip(minilm):
    model, _, inputs, _ = minilm
    student = copy.deepcopy(model)
    shrink = rt.Shrink()
    heads = rt.shrink_attention_heads(student, sorted(of_type(model, "BertSelfAttention")), shrink, 0.25)
    channels = rt.shrink_mlp_channels(student, sorted(of_type(model, "BertIntermediate")), shrink, 0.5)
    assert heads == 6 * 3 and channels == 6 * 768
    assert student.encoder.layer[2].attention.self.query.weight.shape == (288, 384)
    assert student.encoder.layer[2].attention.self.num_attention_heads == 9
    assert student.encoder.layer[2].output.dense.weight.shape == (384, 768)
    with torch.no_grad():  # "training" moves the kept weights
        for p in student.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dense = rt.dense_state_dict({k: v.clone() for k, v in student.state_dict().items()}, shrink)
    restored = copy.deepcopy(model)
    restored.load_state_dict(dense, strict=True)
    query = restored.encoder.layer[2].attention.self.query.weight
    assert int((query.abs().sum(1) == 0).sum()) == 3 * 32  # three zeroed heads of 32 rows

    ctx = lambda t: PassContext(model=restored, example_inputs=inputs, targets=t, source="t.plan:1:1")  # noqa: E731
    out, records = PassManager().run(capture(restored, inputs), [
        (load_pass(Prune(method="heads", sparsity=0.25)), ctx(of_type(model, "BertSelfAttention"))),
        (load_pass(Prune(method="channels", sparsity=0.5)), ctx(of_type(model, "BertIntermediate"))),
    ])
    heads_kept, channels_kept = records[0].details["groups"], records[1].details["groups"]
    for i in range(6):  # the passes keep exactly what training kept
        trained_rows = shrink.cuts[f"encoder.layer.{i}.attention.self.query"][2]
        assert heads_kept[f"encoder.layer.{i}.attention"]["kept"] == sorted({r // 32 for r in trained_rows})
        assert channels_kept[f"encoder.layer.{i}"]["kept"] == shrink.cuts[f"encoder.layer.{i}.intermediate.dense"][2]
    with torch.no_grad():
        torch.testing.assert_close(out(**inputs)["last_hidden_state"], student(**inputs).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
