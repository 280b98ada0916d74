"""share_kv_heads on eager models, against independent references: pooled rows computed by hand,
attention with repeated heads written out head by head, and Hugging Face's own grouped-query
models (built with the smaller num_key_value_heads and given the pooled weights)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from planc.passes.share.gqa import ShareError, pool_heads, share_kv_heads
from share_helpers import hf_model
from shared_models import example_gpt_module

transformers = pytest.importorskip("transformers")


def test_pooled_rows_are_the_mean_of_each_groups_heads():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 6 * 3)  # 6 heads of 3
    pooled = pool_heads(linear, head_dim=3, groups=3)  # -> 2 heads
    assert pooled.weight.shape == (6, 5) and pooled.bias.shape == (6,)
    for shared in range(2):
        for row in range(3):
            members = [(shared * 3 + g) * 3 + row for g in range(3)]
            want_w = sum(linear.weight[m] for m in members) / 3
            want_b = sum(linear.bias[m] for m in members) / 3
            torch.testing.assert_close(pooled.weight[shared * 3 + row], want_w)
            torch.testing.assert_close(pooled.bias[shared * 3 + row], want_b)


def test_as_many_kv_heads_as_heads_changes_nothing(trained_gpt):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in trained_gpt.state_dict().items()}
    with torch.no_grad():
        want = trained_gpt(ids)
        details = share_kv_heads(trained_gpt, 4)
        got = trained_gpt(ids)
    assert details["cache_elements_per_token"][0] == details["cache_elements_per_token"][1]
    assert torch.equal(got, want)
    assert all(torch.equal(v, before[k]) for k, v in trained_gpt.state_dict().items())


def reference_gpt_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The example GPT's forward written out: attention head by head, query head h reading
    key/value head h // (heads / kv_heads) of the projections' own widths."""
    batch, seq = ids.shape
    x = model.tok_emb.weight[ids] + model.pos_emb.weight[torch.arange(seq)]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for block in model.blocks:
        a = block.attn
        h = F.layer_norm(x, (x.shape[-1],), block.ln_1.weight, block.ln_1.bias)
        d = a.head_dim
        q = (h @ a.q_proj.weight.T + a.q_proj.bias).view(batch, seq, -1, d)
        k = (h @ a.k_proj.weight.T + a.k_proj.bias).view(batch, seq, -1, d)
        v = (h @ a.v_proj.weight.T + a.v_proj.bias).view(batch, seq, -1, d)
        heads, kv_heads = q.shape[2], k.shape[2]
        outputs = []
        for head in range(heads):
            shared = head // (heads // kv_heads)
            scores = q[:, :, head] @ k[:, :, shared].transpose(1, 2) / math.sqrt(d)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            outputs.append(weights @ v[:, :, shared])
        x = x + torch.cat(outputs, dim=-1) @ a.out_proj.weight.T + a.out_proj.bias
        h = F.layer_norm(x, (x.shape[-1],), block.ln_2.weight, block.ln_2.bias)
        hidden = F.gelu(h @ block.mlp.fc_in.weight.T + block.mlp.fc_in.bias, approximate="tanh")
        x = x + hidden @ block.mlp.fc_out.weight.T + block.mlp.fc_out.bias
    x = F.layer_norm(x, (x.shape[-1],), model.ln_f.weight, model.ln_f.bias)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_gpt_computes_attention_with_repeated_heads(trained_gpt, kv_heads):
    original = copy.deepcopy(trained_gpt)
    details = share_kv_heads(trained_gpt, kv_heads)
    assert trained_gpt.blocks[0].attn.k_proj.weight.shape == (kv_heads * 16, 64)
    assert trained_gpt.config.n_kv_head == kv_heads
    assert details["cache_elements_per_token"] == [2 * 2 * 4 * 16, 2 * 2 * kv_heads * 16]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = trained_gpt(ids)
        torch.testing.assert_close(got, reference_gpt_logits(trained_gpt, ids), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, original(ids), atol=1e-3)  # pooling did change the model


def test_the_factory_builds_the_same_grouped_gpt(trained_gpt):
    """`gpt(n_kv_head=2)` is the architecture share produces: the pooled weights load into it."""
    share_kv_heads(trained_gpt, 2)
    torch.manual_seed(0)
    native = example_gpt_module().gpt(vocab_size=256, n_layer=2, n_head=4, d_model=64, max_seq=128, n_kv_head=2)
    native.load_state_dict(trained_gpt.state_dict())
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(native(ids), trained_gpt(ids))


@pytest.mark.parametrize("arch,before,after", [("llama", 4, 2), ("qwen2", 4, 1), ("mistral", 4, 2), ("llama", 2, 1)])
def test_hf_models_equal_their_native_grouped_query_counterpart(arch, before, after):
    model = hf_model(arch, before)
    original = copy.deepcopy(model)
    details = share_kv_heads(model, after)
    assert details["family"] == arch and details["kv_heads_before"] == before and details["kv_heads"] == after
    assert model.config.num_key_value_heads == after
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features == after * 16 and attention.num_key_value_groups == 4 // after
    if arch == "qwen2":  # pooled biases too
        torch.testing.assert_close(attention.k_proj.bias, original.model.layers[0].self_attn.k_proj.bias.view(1, 4, 16).mean(1).view(-1))
    native = hf_model(arch, after, seed=1)  # other weights: everything comes from the state dict
    native.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got, native(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, original(input_ids=ids).logits, atol=1e-3)


def test_hf_model_with_as_many_kv_heads_is_unchanged():
    model = hf_model("llama", 2)
    original = copy.deepcopy(model)
    share_kv_heads(model, 2)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


@pytest.mark.parametrize("kv_heads,message", [
    (3, "kv_heads = 3 must divide the 4 heads of blocks.0.attn (possible: 1, 2, 4)"),
    (8, "kv_heads = 8 must divide the 4 heads"),
])
def test_a_count_that_does_not_divide_the_heads_is_refused(trained_gpt, kv_heads, message):
    with pytest.raises(ShareError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        share_kv_heads(trained_gpt, kv_heads)
    assert error.value.option == "kv_heads"


def test_more_kv_heads_than_a_grouped_model_has_is_refused():
    with pytest.raises(ShareError, match="must divide the 2 key/value heads"):
        share_kv_heads(hf_model("llama", 2), 4)


def test_fused_projections_and_encoders_are_refused_with_the_reason():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ShareError, match=r"one fused projection \('c_attn'\)") as error:
        share_kv_heads(gpt2, 2)
    assert error.value.option is None
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ShareError, match="BertConfig.*has no num_key_value_heads"):
        share_kv_heads(bert, 2)
    with pytest.raises(ShareError, match="neither the example GPT nor a Hugging Face model"):
        share_kv_heads(torch.nn.Sequential(torch.nn.Linear(4, 4)), 1)
