"""Prune pass: exact zero counts, N:M patterns, and structured shrinking checked against eager."""

from __future__ import annotations

import copy

import pytest
import torch

from pass_helpers import gpt_inputs, last_hidden, make_ctx, modules_of_type, sentence_embeddings
from planc.passes.base import PassError
from planc.passes.graph_utils import get_tensor
from planc.passes.manager import PassManager
from planc.passes.prune import Prune
from planc.passes.registry import load_pass


def run(gm, model, inputs, targets, **options):
    ctx = make_ctx(model, inputs, targets)
    return PassManager().run(gm, [(load_pass(Prune(**options)), ctx)])


def linear_weights(gm, model, names):
    return {name: get_tensor(gm, f"{name}.weight") for name in names}


def test_magnitude_local_exact_zero_counts(small_gpt):
    model, inputs, gm = small_gpt
    linears = modules_of_type(model, "Linear")
    out, (record,) = run(gm, model, inputs, linears, method="magnitude", sparsity=0.3)
    for name, w in linear_weights(out, model, linears).items():
        assert int((w == 0).sum()) == round(0.3 * w.numel()), name
        original = model.get_submodule(name).weight
        kept = w != 0
        # The survivors are the largest magnitudes, unchanged.
        assert torch.equal(w[kept], original[kept])
        assert original.abs()[kept].min() >= original.abs()[~kept].max()
    assert all(abs(s - 0.3) < 1e-3 for s in record.details["sparsity"].values())
    assert all(n.meta.get("planc_source") == "test.plan:1:1" for n in out.graph.nodes if n.target == torch.ops.aten.linear.default)


def test_magnitude_global_uses_one_threshold(small_gpt):
    model, inputs, gm = small_gpt
    linears = modules_of_type(model, "Linear")
    out, (record,) = run(gm, model, inputs, linears, method="magnitude", sparsity=0.5, scope="global")
    weights = linear_weights(out, model, linears)
    originals = torch.cat([model.get_submodule(n).weight.detach().abs().flatten() for n in weights])
    pruned = torch.cat([w.abs().flatten() for w in weights.values()])
    assert int((pruned == 0).sum()) == round(0.5 * originals.numel())
    threshold = originals.kthvalue(round(0.5 * originals.numel())).values
    assert torch.all(originals[pruned == 0] <= threshold) and torch.all(originals[pruned != 0] >= threshold)
    # out_proj/fc_out are initialised smaller: a single global threshold prunes them harder.
    per_layer = record.details["sparsity"]
    assert per_layer["blocks.0.attn.out_proj"] > 0.6 > per_layer["blocks.0.attn.q_proj"]


def test_nm_two_four_pattern_holds(small_gpt):
    model, inputs, gm = small_gpt
    targets = {"blocks.0.mlp.fc_in", "blocks.1.attn.q_proj"}
    out, _ = run(gm, model, inputs, targets, method="nm", n=2, m=4)
    for name in targets:
        w = get_tensor(out, f"{name}.weight")
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert torch.all(groups == 2), name
        original = model.get_submodule(name).weight.detach().reshape(w.shape[0], -1, 4).abs()
        kept = w.reshape(w.shape[0], -1, 4) != 0
        assert torch.all(original.masked_fill(~kept, float("inf")).amin(-1) >= original.masked_fill(kept, -1).amax(-1))
    untouched = get_tensor(out, "blocks.0.attn.q_proj.weight")
    assert int((untouched == 0).sum()) == 0


def _zero_dropped(model, kind, details):
    """Eager reference: removed heads/channels are equivalent to zeroing their output columns."""
    ref = copy.deepcopy(model)
    for root, info in details["groups"].items():
        module = ref.get_submodule(root)
        if kind == "heads":
            out_name = "out_proj" if hasattr(module, "out_proj") else "output.dense"
            width = info["head_dim"]
            dropped = sorted(set(range(info["total"])) - set(info["kept"]))
            cols = [h * width + i for h in dropped for i in range(width)]
        else:
            out_name = "fc_out" if hasattr(module, "fc_out") else "output.dense"
            cols = sorted(set(range(info["total"])) - set(info["kept"]))
        with torch.no_grad():
            ref.get_submodule(f"{root}.{out_name}").weight[:, cols] = 0
    return ref


@pytest.mark.parametrize("method,selector", [("heads", "Attention"), ("channels", "MLP")])
def test_structured_gpt_shrinks_and_matches_eager(small_gpt, method, selector):
    model, inputs, gm = small_gpt
    out, (record,) = run(gm, model, inputs, modules_of_type(model, selector), method=method, sparsity=0.5)
    if method == "heads":
        assert get_tensor(out, "blocks.0.attn.q_proj.weight").shape == (64, 128)
        assert get_tensor(out, "blocks.0.attn.v_proj.bias").shape == (64,)
        assert get_tensor(out, "blocks.0.attn.out_proj.weight").shape == (128, 64)
        assert get_tensor(out, "blocks.0.attn.out_proj.bias").shape == (128,)
        assert get_tensor(out, "blocks.0.ln_1.weight").shape == (128,)
        weights = ["q_proj", "k_proj", "v_proj", "out_proj"]
        prefix = "attn"
    else:
        assert get_tensor(out, "blocks.1.mlp.fc_in.weight").shape == (256, 128)
        assert get_tensor(out, "blocks.1.mlp.fc_out.weight").shape == (128, 256)
        weights, prefix = ["fc_in", "fc_out"], "mlp"
    for block in (0, 1):
        before = sum(model.get_submodule(f"blocks.{block}.{prefix}.{w}").weight.numel() for w in weights)
        after = sum(get_tensor(out, f"blocks.{block}.{prefix}.{w}.weight").numel() for w in weights)
        assert after == before // 2
    assert record.after.params < record.before.params
    reference = _zero_dropped(model, method, record.details)
    for batch, seq in [(2, 16), (3, 27)]:
        sample = gpt_inputs(batch, seq)
        torch.testing.assert_close(out(**sample), reference(**sample), rtol=1e-4, atol=1e-5)


def test_head_count_constant_is_rewritten():
    """A view that spells out the number of heads gets the new count."""

    class FixedHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (torch.nn.Linear(32, 32) for _ in range(4))

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, 4, 8).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out_proj(y.transpose(1, 2).reshape(b, s, 32))

    torch.manual_seed(0)
    model = FixedHeads().eval()
    x = torch.randn(2, 5, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},), strict=False)
    gm = program.module()
    ctx = make_ctx(model, {"x": x}, {""})
    pass_ = load_pass(Prune(method="heads", sparsity=0.5))
    pass_.requires(gm, ctx)
    result = pass_.call(gm, ctx)
    gm.recompile()
    views = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)]
    assert any(2 in n.args[1] for n in views) and all(4 not in n.args[1] for n in views)
    assert any(16 in n.args[1] for n in views)
    info = result.details["groups"][""]
    ref = copy.deepcopy(model)
    dropped = sorted(set(range(4)) - set(info["kept"]))
    with torch.no_grad():
        ref.out_proj.weight[:, [h * 8 + i for h in dropped for i in range(8)]] = 0
    x2 = torch.randn(3, 7, 32)
    torch.testing.assert_close(gm(x2), ref(x2), rtol=1e-4, atol=1e-5)


def test_bert_heads_and_channels(minilm):
    model, tokenizer, inputs, gm = minilm
    heads_sel = modules_of_type(model, "BertSelfAttention")
    mlp_sel = modules_of_type(model, "BertIntermediate")
    steps = [
        (load_pass(Prune(method="heads", sparsity=0.25)), make_ctx(model, inputs, heads_sel)),
        (load_pass(Prune(method="channels", sparsity=0.25)), make_ctx(model, inputs, mlp_sel)),
    ]
    out, (heads, channels) = PassManager().run(gm, steps)
    assert get_tensor(out, "encoder.layer.0.attention.self.query.weight").shape == (288, 384)
    assert get_tensor(out, "encoder.layer.0.attention.output.dense.weight").shape == (384, 288)
    assert get_tensor(out, "encoder.layer.3.intermediate.dense.weight").shape == (1152, 384)
    assert get_tensor(out, "encoder.layer.3.output.dense.weight").shape == (384, 1152)
    assert heads.details["params_after"] < 0.76 * heads.details["params_before"]
    assert abs(channels.details["params_after"] / channels.details["params_before"] - 0.75) < 0.001
    ref = _zero_dropped(_zero_dropped(model, "heads", heads.details), "channels", channels.details)
    for texts in (["A short one."], ["Two sentences of rather different lengths here.", "Hi!"]):
        sample = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        got = sentence_embeddings(last_hidden(out(**sample)), sample["attention_mask"])
        want = sentence_embeddings(ref(**sample).last_hidden_state, sample["attention_mask"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_errors_are_actionable(small_gpt):
    model, inputs, gm = small_gpt
    with pytest.raises(PassError, match="gradual"):
        run(gm, model, inputs, {"blocks.0"}, schedule="gradual")
    with pytest.raises(PassError, match="no attention"):
        run(gm, model, inputs, {"blocks.0.mlp"}, method="heads")
    with pytest.raises(PassError, match="divisible by 3"):
        run(gm, model, inputs, {"blocks.0"}, method="nm", n=1, m=3)


def test_structured_after_lowrank_is_refused(small_gpt):
    from planc.passes.lowrank.factorize import LowRankPass
    from planc.passes.lowrank import LowRank

    model, inputs, gm = small_gpt
    steps = [
        (LowRankPass(LowRank(rank=8)), make_ctx(model, inputs, {"blocks.0.attn.q_proj"})),
        (load_pass(Prune(method="heads")), make_ctx(model, inputs, {"blocks.1.attn"})),
    ]
    out, _ = PassManager().run(gm, steps)  # another block: fine
    assert get_tensor(out, "blocks.1.attn.q_proj.weight").shape == (64, 128)
    steps[1] = (load_pass(Prune(method="heads")), make_ctx(model, inputs, {"blocks.0.attn"}))
    with pytest.raises(PassError, match=r"after \['lowrank'\]: blocks.0.attn.q_proj is already factored"):
        PassManager().run(gm, steps)
