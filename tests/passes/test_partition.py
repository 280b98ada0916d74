"""Partition pass: stages reproduce the unsplit output exactly and are balanced by cost."""

from __future__ import annotations

import pytest
import torch

from pass_helpers import capture, gpt_inputs, make_ctx
from planc.passes.manager import PassManager
from planc.passes.partition import Partition
from planc.passes.partition.split import PartitionPass, balanced_cuts


@pytest.fixture(scope="module")
def gpt12(gpt_factory):
    torch.manual_seed(0)
    model = gpt_factory(n_layer=12)
    inputs = gpt_inputs()
    return model, inputs, capture(model, inputs)


def run(gm, model, inputs, **options):
    return PassManager().run(gm, [(PartitionPass(Partition(**options)), make_ctx(model, inputs, []))])


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("balance", ["params", "flops"])
def test_gpt12_balanced_and_exact(gpt12, stages, balance):
    model, inputs, gm = gpt12
    out, (record,) = run(gm, model, inputs, stages=stages, balance=balance)
    children = [name for name, _ in out.named_children()]
    assert children == [f"submod_{i}" for i in range(stages)]
    costs = [s["cost"] for s in record.details["stages"]]
    assert max(costs) / (sum(costs) / stages) <= 1.10
    assert record.details["imbalance"] == pytest.approx(max(costs) / (sum(costs) / stages))
    if balance == "params":
        assert sum(costs) == sum(p.numel() for p in model.parameters())
        # Each stage owns its parameters: the root holds none of its own.
        assert all(name.startswith("submod_") for name, _ in out.named_parameters())
    for batch, seq in [(2, 16), (1, 33)]:
        sample = gpt_inputs(batch, seq)
        with torch.no_grad():
            assert torch.equal(out(**sample), gm(**sample))


def test_params_cost_per_stage_counts_blocks(gpt12):
    model, inputs, gm = gpt12
    _, (record,) = run(gm, model, inputs, stages=4, balance="params")
    block = sum(p.numel() for p in model.blocks[0].parameters())
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    first = record.details["stages"][0]
    assert first["units"] == ["(before blocks)", "blocks.2"]
    assert first["cost"] == embeddings + 3 * block


def test_node_boundary_and_time(small_gpt):
    model, inputs, gm = small_gpt
    out, (record,) = run(gm, model, inputs, stages=3, balance="time", boundary="nodes")
    assert len(record.details["stages"]) == 3
    sample = gpt_inputs(2, 9)
    with torch.no_grad():
        assert torch.equal(out(**sample), gm(**sample))


def test_minilm_layers(minilm):
    model, _, inputs, gm = minilm
    out, (record,) = run(gm, model, inputs, stages=3, balance="flops")
    units = [s["units"] for s in record.details["stages"]]
    assert units[0][0] == "(before blocks)" and units[-1][-1] == "(after blocks)"
    assert all(u.startswith("encoder.layer.") for stage in units for u in stage if "blocks" not in u)
    with torch.no_grad():
        got, want = out(**inputs), gm(**inputs)
    assert torch.equal(got["last_hidden_state"], want["last_hidden_state"])


def test_balanced_cuts_is_optimal():
    costs = torch.tensor([5.0, 1, 1, 1, 1, 1, 5]).numpy()
    assert balanced_cuts(costs, 3) == [0, 1, 6]
    # Brute force on a random instance.
    import itertools

    import numpy as np

    rng = np.random.default_rng(0)
    costs = rng.random(9)
    best = min(
        max(costs[a:b].sum() for a, b in zip((0, *cut), (*cut, 9)))
        for cut in itertools.combinations(range(1, 9), 3)
    )
    starts = balanced_cuts(costs, 4)
    ends = starts[1:] + [9]
    assert max(costs[a:b].sum() for a, b in zip(starts, ends)) == pytest.approx(best)
