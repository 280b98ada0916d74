"""Low-rank pass: SVD error bound, parameter savings, skipping layers that would grow."""

from __future__ import annotations

import copy

import pytest
import torch

from pass_helpers import gpt_inputs, make_ctx
from planc.passes.graph_utils import get_tensor
from planc.passes.lowrank.factorize import LowRankPass
from planc.passes.ranks import choose_rank
from planc.passes.manager import PassManager
from planc.passes.lowrank import LowRank


def test_rank_reconstruction_error_equals_svd_bound(small_gpt):
    model, inputs, gm = small_gpt
    targets = {"blocks.0.attn.q_proj", "blocks.1.mlp.fc_in"}
    out, (record,) = PassManager().run(gm, [(LowRankPass(LowRank(rank=16)), make_ctx(model, inputs, targets))])
    for name in targets:
        w = model.get_submodule(name).weight.detach().double()
        a = get_tensor(out, f"{name}.lowrank_in.weight").double()
        b = get_tensor(out, f"{name}.lowrank_out.weight").double()
        assert a.shape == (16, w.shape[1]) and b.shape == (w.shape[0], 16)
        s = torch.linalg.svdvals(w)
        bound = float(s[16:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        error = float(torch.linalg.norm(w - b @ a) / torch.linalg.norm(w))
        assert error == pytest.approx(bound, rel=1e-4)
        assert record.details["factored"][name]["relative_error"] == pytest.approx(bound, rel=1e-4)
    # The float weight is gone; params dropped by what the factors saved.
    assert not hasattr(out.get_submodule("blocks.0.attn.q_proj"), "weight")
    saved = 128 * 128 - 16 * 256 + 512 * 128 - 16 * 640
    assert record.before.params - record.after.params == saved
    # The factored graph computes x A^T B^T + b: compare against eager with W replaced by B A.
    sample = gpt_inputs(3, 21)
    with torch.no_grad():
        ref = copy.deepcopy(model)
        for name in targets:
            layer = ref.get_submodule(name)
            layer.weight.copy_(get_tensor(out, f"{name}.lowrank_out.weight") @ get_tensor(out, f"{name}.lowrank_in.weight"))
        torch.testing.assert_close(out(**sample), ref(**sample), rtol=1e-4, atol=1e-5)


def test_energy_picks_smallest_rank_and_skips_growth(small_gpt):
    model, inputs, gm = small_gpt
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert choose_rank(s, None, 16 / 22) == 1
    assert choose_rank(s, None, 0.9) == 2  # (16 + 4) / 22 = 0.909
    assert choose_rank(s, None, 1.0) == 4
    targets = {"blocks.0.attn.k_proj"}
    out, (record,) = PassManager().run(gm, [(LowRankPass(LowRank(energy=0.999)), make_ctx(model, inputs, targets))])
    # Random init has a flat spectrum: ~full rank is needed, which would add parameters.
    assert "blocks.0.attn.k_proj" in record.details["skipped"]
    assert record.after.params == record.before.params
    assert torch.equal(get_tensor(out, "blocks.0.attn.k_proj.weight"), model.blocks[0].attn.k_proj.weight)
