"""Cast pass: dtypes by node, kept ops in fp32, no stacked casts, outputs close to eager."""

from __future__ import annotations

import pytest
import torch

from pass_helpers import gpt_inputs, make_ctx
from planc.passes.cast.convert import CAST, CastPass
from planc.passes.graph_utils import get_tensor, owner_path, record_shapes
from planc.passes.manager import PassManager
from planc.passes.cast import Cast

LAYER_NORM = torch.ops.aten.layer_norm.default
LINEAR = torch.ops.aten.linear.default


def run(gm, model, inputs, targets=(), **options):
    return PassManager().run(gm, [(CastPass(Cast(**options)), make_ctx(model, inputs, targets))])


def input_dtypes(node):
    return {a.meta["planc_dtype"] for a in node.all_input_nodes if a.meta.get("planc_dtype", torch.int64).is_floating_point}


@pytest.mark.parametrize("dtype,low,tol", [("fp16", torch.float16, 3e-3), ("bf16", torch.bfloat16, 2e-2)])
def test_whole_model_cast(small_gpt, dtype, low, tol):
    model, inputs, gm = small_gpt
    out, (record,) = run(gm, model, inputs, dtype=dtype)
    record_shapes(out, inputs)
    for node in out.graph.find_nodes(op="call_function", target=LINEAR):
        assert node.meta["planc_dtype"] == low and input_dtypes(node) == {low}
    for node in out.graph.find_nodes(op="call_function", target=LAYER_NORM):
        assert node.meta["planc_dtype"] == torch.float32 and input_dtypes(node) == {torch.float32}
    assert get_tensor(out, "blocks.0.attn.q_proj.weight").dtype == low
    assert get_tensor(out, "blocks.0.ln_1.weight").dtype == torch.float32
    for cast in out.graph.find_nodes(op="call_function", target=CAST):
        assert cast.args[0].target not in (CAST, torch.ops.aten.to.dtype)
    assert record.after.bytes < 0.55 * record.before.bytes
    for batch, seq in [(2, 16), (3, 25)]:
        sample = gpt_inputs(batch, seq)
        with torch.no_grad():
            got, want = out(**sample), model(**sample)
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < tol


def test_selected_block_only_and_kept_embedding(small_gpt):
    model, inputs, gm = small_gpt
    out, (record,) = run(gm, model, inputs, ["blocks.1"], keep_fp32=["layernorm", "softmax", "embedding"])
    record_shapes(out, inputs)
    for node in out.graph.find_nodes(op="call_function", target=LINEAR):
        want = torch.float16 if owner_path(node).startswith("blocks.1.") else torch.float32
        assert node.meta["planc_dtype"] == want, node.name
    assert get_tensor(out, "tok_emb.weight").dtype == torch.float32
    assert get_tensor(out, "blocks.0.mlp.fc_in.weight").dtype == torch.float32
    assert get_tensor(out, "blocks.1.mlp.fc_in.weight").dtype == torch.float16
    casts = out.graph.find_nodes(op="call_function", target=CAST)
    # Into the block: one cast of ln_1's output and one of the residual; out of it: the residual stream.
    assert 2 <= len(casts) <= 8
    sample = gpt_inputs(2, 12)
    with torch.no_grad():
        want = model(**sample)
        assert float((out(**sample) - want).norm() / want.norm()) < 2e-3


def test_embedding_cast_when_not_kept(small_gpt):
    model, inputs, gm = small_gpt
    out, _ = run(gm, model, inputs, keep_fp32=["layernorm"])
    assert get_tensor(out, "tok_emb.weight").dtype == torch.float16
    assert get_tensor(out, "blocks.0.ln_1.weight").dtype == torch.float32
