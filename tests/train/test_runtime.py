"""planc_runtime's pieces, in one process, against independent eager references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from planc.backends.train import planc_runtime as rt
from train_helpers import GPT_FILE, TINY_GPT


def tiny_gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return rt.load_model({"kind": "factory", "file": str(GPT_FILE), "function": "gpt", "args": TINY_GPT})


def ids(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_removing_heads_equals_zeroing_them_and_saves_loadable_weights() -> None:
    model = tiny_gpt()
    attn = model.blocks[0].attn
    d = attn.head_dim
    # Make head 2 the least important, then zero it by hand: the independent reference.
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight[2 * d : 3 * d] *= 1e-3
    reference = tiny_gpt()
    reference.load_state_dict(model.state_dict())
    ref_attn = reference.blocks[0].attn
    for proj in (ref_attn.q_proj, ref_attn.k_proj, ref_attn.v_proj):
        proj.weight[2 * d : 3 * d] = 0
        proj.bias[2 * d : 3 * d] = 0
    ref_attn.out_proj.weight[:, 2 * d : 3 * d] = 0

    shrink = rt.Shrink()
    removed = rt.shrink_attention_heads(model, ["blocks.0.attn.q_proj"], shrink, 0.25, "l2")
    assert removed == 1 and model.blocks[0].attn.q_proj.out_features == 3 * d
    x = ids()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)

    # Saved weights come back at the original size, with the removed head as zeros.
    dense = rt.dense_state_dict(model.state_dict(), shrink)
    restored = tiny_gpt(seed=5)
    restored.load_state_dict(dense)
    torch.testing.assert_close(restored(x), reference(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_removing_mlp_channels_keeps_the_strongest() -> None:
    model = tiny_gpt()
    mlp = model.blocks[1].mlp
    keep_before = (mlp.fc_in.weight.pow(2).sum(1) + mlp.fc_out.weight.pow(2).sum(0)).topk(128).indices.sort().values
    x = ids()
    shrink = rt.Shrink()
    assert rt.shrink_mlp_channels(model, ["blocks.1.mlp"], shrink, 0.5, "l2") == 128
    assert model.blocks[1].mlp.fc_in.out_features == 128
    assert shrink.cuts["blocks.1.mlp.fc_in"][2] == keep_before.tolist()
    reference = tiny_gpt()
    ref = reference.blocks[1].mlp
    dropped = torch.ones(256, dtype=torch.bool)
    dropped[keep_before] = False
    ref.fc_in.weight[dropped] = 0
    ref.fc_in.bias[dropped] = 0
    ref.fc_out.weight[:, dropped] = 0
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_magnitude_masks_zero_the_smallest_weights() -> None:
    model = tiny_gpt()
    paths = ["blocks.0.mlp.fc_in", "blocks.1.attn.q_proj"]
    originals = {p: model.get_submodule(p).weight.clone() for p in paths}
    masks = rt.PruneMasks(model, paths, "magnitude", 0.5, 2, 4, "local", gradual=False, ramp_steps=0)
    masks.update(step=0)
    for path, original in originals.items():
        weight = model.get_submodule(path).weight
        k = int(0.5 * original.numel())
        smallest = original.abs().flatten().argsort()[:k]
        assert (weight.flatten()[smallest] == 0).all()
        assert int((weight == 0).sum()) == k
    # Training moves pruned weights; apply() zeroes them again.
    for path in paths:
        model.get_submodule(path).weight.add_(1.0)
    masks.apply()
    assert masks.sparsity() == pytest.approx(0.5, abs=1e-3)


@torch.no_grad()
def test_global_and_nm_masks() -> None:
    model = tiny_gpt()
    paths = ["blocks.0.mlp.fc_in", "blocks.0.attn.v_proj"]
    everything = torch.cat([model.get_submodule(p).weight.abs().flatten() for p in paths])
    threshold = everything.kthvalue(int(0.7 * everything.numel())).values
    masks = rt.PruneMasks(model, paths, "magnitude", 0.7, 2, 4, "global", gradual=False, ramp_steps=0)
    masks.update(0)
    for p in paths:
        weight = model.get_submodule(p).weight
        assert ((weight != 0) == (weight.abs() > threshold)).all()

    model = tiny_gpt()
    nm = rt.PruneMasks(model, ["blocks.1.mlp.fc_out"], "nm", 0.5, 2, 4, "local", gradual=False, ramp_steps=0)
    nm.update(0)
    groups = model.blocks[1].mlp.fc_out.weight.reshape(-1, 4)
    assert ((groups == 0).sum(1) == 2).all()


def test_gradual_sparsity_ramps_up() -> None:
    model = tiny_gpt()
    masks = rt.PruneMasks(model, ["blocks.0.mlp.fc_in"], "magnitude", 0.8, 2, 4, "local", gradual=True, ramp_steps=10)
    seen = []
    for step in range(12):
        masks.update(step)
        seen.append(masks.sparsity())
    assert seen[0] == 0.0 and seen == sorted(seen) and seen[-1] == pytest.approx(0.8, abs=1e-3)


def test_fake_quant_forward_is_quantized_and_gradient_passes_straight_through() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    quant = rt.FakeQuantLinear.from_linear(linear, "int8", "weight_only", "per_channel", 32, True)
    assert quant.weight is linear.weight
    x = torch.randn(4, 32)
    # Independent reference: round each row to its own 255-level grid.
    scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
    expected_weight = (linear.weight.detach() / scale).round() * scale
    torch.testing.assert_close(quant(x), F.linear(x, expected_weight, linear.bias))
    quant(x).sum().backward()
    grad_quant = linear.weight.grad.clone()
    linear.weight.grad = None
    F.linear(x, linear.weight, linear.bias).sum().backward()
    torch.testing.assert_close(grad_quant, linear.weight.grad)

    # int4 per group of 16 inputs: every group lies on its own 16-level grid [-8, 7] x scale.
    int4 = rt.FakeQuantLinear.from_linear(linear, "int4", "weight_only", "per_group", 16, True)
    groups = linear.weight.detach().reshape(-1, 16)
    levels = int4(torch.eye(32)).detach().sub(linear.bias.detach()).t().reshape(-1, 16) / (
        groups.abs().amax(1, keepdim=True) / 7
    )
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.round().min() >= -8 and levels.round().max() <= 7


@torch.no_grad()
def test_low_rank_factors_and_merges_back() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 12)
    full = rt.LowRankLinear(linear, rank=12, energy=None)
    x = torch.randn(3, 16)
    torch.testing.assert_close(full(x), linear(x), atol=1e-5, rtol=1e-5)
    low = rt.LowRankLinear(linear, rank=None, energy=0.5)
    assert 1 <= low.down.out_features < 12
    state = {f"fc.{k}": v for k, v in low.state_dict().items()}
    merged = rt.dense_state_dict(state, rt.Shrink())
    assert merged["fc.weight"].shape == (12, 16)
    torch.testing.assert_close(F.linear(x, merged["fc.weight"], merged["fc.bias"]), low(x), atol=1e-5, rtol=1e-5)


def test_lr_schedule() -> None:
    assert rt.lr_multiplier(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert rt.lr_multiplier(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert rt.lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert rt.lr_multiplier(55, 100, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rt.lr_multiplier(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert rt.lr_multiplier(55, 100, 0, "constant", 0.0) == 1.0


def test_data_parallel_batches_partition_the_single_process_batch() -> None:
    rows = torch.arange(200).view(100, 2)
    single = rt.BatchStream(rows, 8, 0, 1, seed=3)
    ranks = [rt.BatchStream(rows, 4, r, 2, seed=3) for r in range(2)]
    for index in (0, 5, 11, 12, 30):  # 12 batches of 8 per epoch: crosses epochs
        together = torch.cat([s.batch(index) for s in ranks])
        assert sorted(together[:, 0].tolist()) == sorted(single.batch(index)[:, 0].tolist())
    # A fresh stream (a resumed run) asks by index and sees the same data.
    assert torch.equal(rt.BatchStream(rows, 4, 1, 2, seed=3).batch(30), ranks[1].batch(30))


def test_pack_split_and_heldout() -> None:
    rows = rt.pack(torch.arange(100), seq_len=9)
    assert rows.shape == (10, 10) and rows[1, 0] == 10
    train, held = rt.split_heldout(rows, 0.2)
    assert len(train) == 8 and len(held) == 2 and held[0, 0] == 80
    batches = rt.heldout_batches(torch.arange(40).view(20, 2), 3, 1, 2, limit=13, multiple=1)
    assert sum(len(b) for b in batches) == 6 and batches[0][0, 0] == 12


def test_distill_kl() -> None:
    teacher, student = tiny_gpt(0), tiny_gpt(1)
    distiller = rt.Distiller(teacher, student, temperature=2.0, alpha=0.5, losses=["logits", "hidden"], layer_map=[[0, 1]])
    logits = torch.randn(2, 5, 256)
    assert distiller.kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distiller.kl(logits, logits.flip(-1)).item() > 0
    x = ids()
    out = student(x)
    task = rt.causal_lm_loss(out[:, :-1], x[:, 1:])
    loss = distiller.loss(out, x, task)
    loss.backward()
    assert loss.item() > 0.5 * task.item() and student.blocks[0].attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_activation_checkpointing_keeps_names_and_gradients() -> None:
    model, reference = tiny_gpt(), tiny_gpt()
    rt.checkpoint_blocks(model.blocks)
    assert list(model.state_dict()) == list(reference.state_dict())
    x = ids()
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    torch.testing.assert_close(model.blocks[0].mlp.fc_in.weight.grad, reference.blocks[0].mlp.fc_in.weight.grad)


def test_stdlib_corpus_is_read_in_sorted_order_up_to_the_cap(tmp_path) -> None:
    import sysconfig
    from pathlib import Path

    documents = rt.read_documents("stdlib", "*.py", 5000, tmp_path)
    assert sum(map(len, documents)) == 5000
    first = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "site-packages" not in p.parts)[0]
    assert documents[0] == first.read_bytes()[:5000] or first.read_bytes().startswith(documents[0])
    ids = rt.tokenize(documents, "bytes", {"kind": "factory"})
    assert ids.max() < 256 and len(ids) == 5000 + len(documents) - 1


@torch.no_grad()
def test_masks_restored_from_checkpointed_weights() -> None:
    model = tiny_gpt()
    masks = rt.PruneMasks(model, ["blocks.0.mlp.fc_in"], "magnitude", 0.8, gradual=True, ramp_steps=10)
    masks.update(5)
    saved_weights, saved = {k: v.clone() for k, v in model.state_dict().items()}, masks.state_dict()
    resumed = tiny_gpt(seed=3)
    resumed.load_state_dict(saved_weights)
    restored = rt.PruneMasks(resumed, ["blocks.0.mlp.fc_in"], "magnitude", 0.8, gradual=True, ramp_steps=10)
    restored.load_state_dict(saved)
    resumed.blocks[0].mlp.fc_in.weight.add_(1.0)
    restored.apply()
    assert torch.equal(resumed.blocks[0].mlp.fc_in.weight == 0, model.blocks[0].mlp.fc_in.weight == 0)
    assert restored.fraction == masks.fraction
