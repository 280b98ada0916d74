"""`prune` in a decode target: the zeros reach the exported decoder, which is checked against the
eager model pruned by the tests' own code, and its goal is measured against the unpruned model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from planc.backends.onnx.decoder.session import DecoderSession
from planc.compiler.driver import compile_plan, load_model
from planc.compiler.validate import load_plan
from planc.dsl.source import PlanError

ROOT = Path(__file__).resolve().parents[2]
GPT = f'model gpt = factory("{ROOT / "examples" / "models" / "gpt.py"}:gpt", n_layer = 2, d_model = 64) {{ task = causal_lm }}\n'
TARGET = 'target onnx {{ {options}decode {{ max_new_tokens = 4 }}, verify {{ metric = top1, goal = ">= 0.1" }}, bench {{ runs = 3 }} }}\n'
PROMPT = np.array([list(b"def main(argv):\n    return 0\n")], np.int64)


def magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The round(sparsity * numel) smallest |w| of the tensor set to zero."""
    drop = round(sparsity * w.numel())
    flat = w.flatten().clone()
    flat[flat.abs().argsort(stable=True)[:drop]] = 0.0
    return flat.reshape(w.shape)


def two_of_four(w: torch.Tensor, input_dim: int) -> torch.Tensor:
    """The 2 smallest |w| of every 4 consecutive inputs set to zero."""
    w = w.transpose(0, 1) if input_dim == 0 else w  # [out, in]
    groups = w.reshape(w.shape[0], -1, 4).clone()
    groups.scatter_(-1, groups.abs().argsort(dim=-1, stable=True)[..., :2], 0.0)
    pruned = groups.reshape(w.shape)
    return pruned.transpose(0, 1) if input_dim == 0 else pruned


def eager_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(PROMPT))
    return (out.logits if hasattr(out, "logits") else out).float().numpy()


def compile_to(tmp_path: Path, text: str) -> tuple[Path, dict, torch.nn.Module]:
    plan_file = tmp_path / "p.plan"
    plan_file.write_text(text)
    result = compile_plan(plan_file, tmp_path / "out")
    plan, _ = load_plan(plan_file)
    return Path(result.artifact), result.report, load_model(plan).model.eval()


def test_magnitude_pruning_reaches_the_decoder(tmp_path):
    artifact, report, model = compile_to(
        tmp_path, GPT + 'pipeline { prune Linear - name("lm_head") { sparsity = 50% } }\n' + TARGET.format(options=""))
    dense = eager_logits(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(magnitude(module.weight, 0.5))
    onnx_logits = DecoderSession(artifact).logits(PROMPT)
    np.testing.assert_allclose(onnx_logits, eager_logits(model), atol=1e-4, rtol=1e-4)
    assert np.abs(onnx_logits - dense).max() > 1e-2  # the zeros are there
    assert report["passes"][0]["name"] == "prune" and "50.0% sparsity" in report["passes"][0]["summary"]
    # measured against the unpruned model: not a perfect match
    assert report["accuracy"]["metric"] == "top1" and report["accuracy"]["value"] < 1.0


def test_two_of_four_on_gpt2_conv1d(tmp_path, gpt2_dir):
    """GPT-2's Conv1D keeps its weight [in, out]: 2:4 groups run along its first dimension."""
    plan = (f'model gpt2 = hf("{gpt2_dir}") {{ task = causal_lm }}\n'
            "pipeline { prune Conv1D { method = nm, n = 2, m = 4 } }\n" + TARGET.format(options=""))
    artifact, report, model = compile_to(tmp_path, plan)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Conv1D":
                module.weight.copy_(two_of_four(module.weight, input_dim=0))
    np.testing.assert_allclose(DecoderSession(artifact).logits(PROMPT), eager_logits(model), atol=1e-4, rtol=1e-4)
    assert json.loads((artifact / "report.json").read_text())["passes"][0]["name"] == "prune"


@pytest.mark.parametrize(("pipeline", "where", "message"), [
    ("prune Linear { method = heads, sparsity = 50% }", "3:3", "a decode target takes weight pruning"),
    ('prune Linear { sparsity = 50% }\n  quantize Linear { scheme = int4, method = gptq, calibration = stdlib }', "4:45",
     "gptq after pruning fills the pruned weights back in"),
])
def test_what_a_decoder_cannot_prune_is_located(tmp_path, pipeline, where, message):
    plan_file = tmp_path / "p.plan"
    plan_file.write_text(GPT + f"pipeline {{\n  {pipeline}\n}}\n" + TARGET.format(options=""))
    with pytest.raises(PlanError) as error:
        compile_plan(plan_file, tmp_path / "out")
    diagnostic = error.value.diagnostics[0]
    assert message in diagnostic.message and f"{diagnostic.span.line}:{diagnostic.span.col}" == where
    assert not (tmp_path / "out").exists()
