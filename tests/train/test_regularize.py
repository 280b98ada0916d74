"""`target train { regularize { } }`: group lasso on heads/channels, L1 on weights.

The penalty is checked against sums written out by hand over the example GPT's own
projections (a head: rows h*d..(h+1)*d of q/k/v and their biases, the same columns of
out_proj; a channel: a row of fc_in and its bias, a column of fc_out), not against the graph
analysis the regularizer uses. The training runs check the effect: more heads at zero with the
penalty than without, a falling held-out loss, and the compile-time prune (importance = l2)
removing heads that reached zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import GPT_FILE, REPO, TINY_GPT, final_eval, gpt_source, metrics, run_program, small_corpus, target

from planc.backends.train import planc_runtime as rt
from planc.backends.train.emit import emit_training_program
from planc.compiler.validate import check_file
from planc.passes.prune import Prune

EXAMPLE = REPO / "examples" / "gpt_group_lasso.plan"
HEAD_DIM = TINY_GPT["d_model"] // TINY_GPT["n_head"]


def tiny_gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return rt.load_model({"kind": "factory", "file": str(GPT_FILE), "function": "gpt", "args": dict(TINY_GPT)})


def head_norms(model: torch.nn.Module) -> list[torch.Tensor]:
    """||W_g||_2 of every head, block after block, written out from the module's weights."""
    norms = []
    for block in model.blocks:
        attn = block.attn
        for h in range(TINY_GPT["n_head"]):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            square = sum(getattr(attn, name).weight[rows].pow(2).sum() + getattr(attn, name).bias[rows].pow(2).sum()
                         for name in ("q_proj", "k_proj", "v_proj"))
            norms.append((square + attn.out_proj.weight[:, rows].pow(2).sum()).sqrt().detach())
    return norms


def test_group_lasso_on_heads_is_the_hand_computed_sum() -> None:
    model = tiny_gpt()
    lasso = rt.regularizer(model, None, "heads", l1=0.3, threshold=1e-3)
    expected = head_norms(model)
    torch.testing.assert_close(lasso.norms(), torch.stack(expected), rtol=1e-5, atol=0)
    d = TINY_GPT["d_model"]
    entries = 3 * HEAD_DIM * d + 3 * HEAD_DIM + d * HEAD_DIM  # q/k/v rows and biases, out_proj columns
    assert lasso.value() == pytest.approx(0.3 * math.sqrt(entries) * float(sum(expected)), rel=1e-5)


def test_group_lasso_on_channels_and_l1_on_weights_are_the_hand_computed_sums() -> None:
    model = tiny_gpt()
    lasso = rt.regularizer(model, ["blocks.1.mlp"], "channels", l1=0.1, threshold=1e-3)
    mlp = model.blocks[1].mlp
    expected = (mlp.fc_in.weight.pow(2).sum(1) + mlp.fc_in.bias.pow(2) + mlp.fc_out.weight.pow(2).sum(0)).sqrt().detach()
    torch.testing.assert_close(lasso.norms(), expected, rtol=1e-5, atol=0)
    entries = 2 * TINY_GPT["d_model"] + 1
    assert lasso.value() == pytest.approx(0.1 * math.sqrt(entries) * float(expected.sum()), rel=1e-5)

    l1 = rt.regularizer(model, None, "weights", l1=0.01, threshold=1e-3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert l1.value() == pytest.approx(0.01 * sum(float(m.weight.detach().abs().sum()) for m in linears), rel=1e-5)


def test_proximal_step_shrinks_every_head_and_zeroes_the_small_ones_exactly() -> None:
    model = tiny_gpt()
    lasso = rt.regularizer(model, None, "heads", l1=1.0, threshold=0.0)
    before = torch.stack(head_norms(model))
    entries = float(lasso.sizes[0])
    shrink = float(before.median())  # lr * l1 * sqrt(p_g): half the heads are smaller than this
    lasso.prox(shrink / math.sqrt(entries))
    after = torch.stack(head_norms(model))
    small = before <= shrink
    assert 0 < int(small.sum()) < len(before)
    assert torch.all(after[small] == 0)
    torch.testing.assert_close(after[~small], before[~small] - shrink, rtol=1e-4, atol=1e-6)
    assert lasso.zeros() == int(small.sum())


def test_prune_after_regularize_removes_zero_heads_first() -> None:
    model = tiny_gpt()
    lasso = rt.regularizer(model, None, "heads", l1=1.0, threshold=1e-3)
    with torch.no_grad():  # one zero head per block, not the weakest by norm
        for block, head in zip(model.blocks, (2, 0)):
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(block.attn, name).weight[rows] = 0
                getattr(block.attn, name).bias[rows] = 0
            block.attn.out_proj.weight[:, rows] = 0
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    before = model(ids)
    report = lasso.finish()
    assert report["zero_groups"] == 2 and report["per_block"] == {"blocks.0.attn": [1, 4], "blocks.1.attn": [1, 4]}
    assert lasso.prune(["blocks.0.attn", "blocks.1.attn"], sparsity=0.25) == {
        "removed": 2, "removed_nonzero": 0, "zero_kept": 0}
    assert torch.equal(model(ids), before)  # only zeros went: the function is the same
    assert lasso.prune(["blocks.0.attn"], sparsity=0.5)["removed_nonzero"] == 1


def test_example_plan_checks_and_its_program_regularizes_then_prunes(tmp_path: Path) -> None:
    checked = check_file(EXAMPLE)
    assert checked.ok, checked.diagnostics
    train = checked.plan.target("train").options
    assert train.regularize.group == "heads" and train.regularize.l1 > 0
    prune = [s.options for s in checked.plan.pipeline if isinstance(s.options, Prune)]
    assert [(p.method, p.importance) for p in prune] == [("heads", "l2")]

    import planc

    result = planc.compile(EXAMPLE, out_dir=tmp_path / "program", emit="train")
    code = (result.artifact / "train.py").read_text()
    assert "regularizer = rt.regularizer(model, REGULARIZE_MODULES, **REGULARIZE, example=example)" in code
    assert "regularizer.prox(scheduler.get_last_lr()[0])" in code
    assert 'report["prune"] = {"step1": regularizer.prune(STEP1_MODULES, **STEP1)}' in code
    assert "rt.shrink_attention_heads" not in code  # the heads prune runs after training, not before


# ----------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_group_lasso_zeroes_heads_the_loss_falls_and_prune_removes_zero_heads(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path, 120_000)
    options = dict(steps=100, log_every=10, world_size=2, schedule={"warmup": 10, "decay": "cosine"})
    plain = emit_training_program(target(corpus, **options), gpt_source(), [], None, tmp_path / "plain", "")
    heads = [f"blocks.{i}.attn" for i in range(TINY_GPT["n_layer"])]
    lasso = emit_training_program(
        target(corpus, **options, regularize={"group": "heads", "l1": 0.5}), gpt_source(),
        [(Prune(method="heads", sparsity=0.25), heads)], None, tmp_path / "lasso", "")
    for out in (plain, lasso):
        run_program(out, nproc=2, timeout=600)

    def zero_heads(weights: Path) -> list[int]:
        model = tiny_gpt()
        model.load_state_dict(torch.load(weights, weights_only=True))
        return [i for i, norm in enumerate(head_norms(model)) if norm <= 1e-3]

    assert len(zero_heads(lasso / "trained.pt")) > len(zero_heads(plain / "trained.pt"))
    for out in (plain, lasso):
        evals = [e["eval_loss"] for e in metrics(out) if e.get("event") == "eval"]
        assert evals[-1] < 0.8 * evals[0], (out.name, evals)

    report = next(e for e in metrics(lasso) if e.get("event") == "regularize")
    saved_zero = zero_heads(lasso / "trained.pt")
    assert report["zero_groups"] + report["prune"]["step1"]["removed_nonzero"] == len(saved_zero)
    if all(zero >= 1 for zero, _ in report["per_block"].values()):  # the prune takes 1 head of 4 per block
        assert report["prune"]["step1"]["removed_nonzero"] == 0
    assert final_eval(lasso)["step"] == 100

    # The compile after training: prune heads by l2 on the trained weights removes zero heads.
    from planc.passes.base import PassContext
    from planc.passes.registry import load_pass

    model = tiny_gpt()
    model.load_state_dict(torch.load(lasso / "trained.pt", weights_only=True))
    inputs = {"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))}
    graph = torch.export.export(model.eval(), (), kwargs=inputs, strict=False).module()
    pass_ = load_pass(Prune(method="heads", sparsity=0.25))
    ctx = PassContext(model=model, example_inputs=inputs, targets=frozenset(heads), source="test.plan:1:1")
    groups = pass_.call(graph, ctx).details["groups"]
    removed = [b * TINY_GPT["n_head"] + h for b, root in enumerate(heads)
               for h in sorted(set(range(TINY_GPT["n_head"])) - set(groups[root]["kept"]))]
    assert removed and set(removed) <= set(saved_zero)
