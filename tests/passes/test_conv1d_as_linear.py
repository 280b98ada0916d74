"""GPT-2's Conv1D projections, captured as Linears: same outputs, one kind of projection."""

from __future__ import annotations

import torch

from planc.passes.graph_utils import ADDMM, LINEAR, conv1d_as_linear, linear_sites


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, use_cache=False)
    return GPT2LMHeadModel(config).eval()


def test_conv1d_projections_become_linears_with_the_same_outputs() -> None:
    model = _gpt2()
    ids = torch.tensor([[5, 17, 42, 8, 0, 0], [3, 96, 11, 54, 23, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    gm = torch.export.export(model, (), kwargs={"input_ids": ids, "attention_mask": mask}, strict=False).module()
    before = gm(input_ids=ids, attention_mask=mask).logits
    conv1ds = sum(type(m).__name__ == "Conv1D" for m in model.modules())

    assert conv1d_as_linear(gm) == conv1ds == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert not list(gm.graph.find_nodes(op="call_function", target=ADDMM))
    sites = {site.module_path: site for site in linear_sites(gm)}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"} <= set(sites)
    c_fc = dict(gm.named_parameters())["transformer.h.1.mlp.c_fc.weight"]
    assert c_fc.shape == (128, 32)  # stored [out, in] now; the eager model keeps [in, out]
    assert torch.equal(c_fc, model.transformer.h[1].mlp.c_fc.weight.t())
    assert len(list(gm.graph.find_nodes(op="call_function", target=LINEAR))) == conv1ds + 1  # + lm_head
    after = gm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
