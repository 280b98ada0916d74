"""Deferred Linear weights: a real-sized decoder's projections read from the checkpoint where used.

References: the model as `from_pretrained` loads it (every weight in memory) for the eager
forward, round-to-nearest on the whole weight for the row-block quantizer, and the artifact a
compile without deferral writes for the streamed compile (the same bytes, the same verdict).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from planc.compiler.model.deferred import load_deferred, streamed


def _bf16_checkpoint(source: Path, out: Path, tied: bool) -> Path:
    """The trained tiny Llama of `source` saved in bf16 (as real checkpoints are), tied or not."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM.from_pretrained(source, config=config)
    if tied:
        model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                                          "eos_token": "</s>"}))
    return out


@pytest.fixture(scope="module")
def checkpoints(llama_dir, tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("bf16")
    return {tied: _bf16_checkpoint(llama_dir, root / ("tied" if tied else "untied"), tied) for tied in (False, True)}


@pytest.mark.parametrize(("tied", "head_blocks"), [(False, False), (True, False), (False, True)])
def test_streamed_forward_equals_the_fully_loaded_model(checkpoints, tied, head_blocks, monkeypatch):
    """Every projection read where used; an untied embedding reads the looked-up rows only, and
    a large LM head (here: over 64 rows) runs block by block."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from planc.compiler.model import deferred as deferral

    if head_blocks:
        monkeypatch.setattr(deferral, "LINEAR_BLOCK_ROWS", 64)
    directory = checkpoints[tied]
    full = AutoModelForCausalLM.from_pretrained(directory).float().eval()
    config = AutoConfig.from_pretrained(directory)
    deferred = load_deferred(directory, AutoModelForCausalLM, config)
    linears = {f"{n}.weight" for n, m in deferred.named_modules() if isinstance(m, torch.nn.Linear)}
    # a tied head is the embedding: loaded; an untied embedding stays in the checkpoint
    expected = linears - {"lm_head.weight"} if tied else linears | {"model.embed_tokens.weight"}
    assert set(deferred._planc_deferred) == expected
    empty = {name: deferred.get_parameter(name) for name in expected}  # storage never written
    ids = torch.tensor([[5, 17, 42, 99, 3], [7, 7, 250, 11, 300]])
    read = []
    monkeypatch.setattr(deferral.CheckpointTensors, "read_rows", lambda self, key, rows, real=deferral.CheckpointTensors.read_rows:
                        read.append((key, len(rows))) or real(self, key, rows))
    with torch.no_grad(), streamed(deferred):
        got = deferred(ids).logits
    with torch.no_grad():
        want = full(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if head_blocks else 0)
    assert all(deferred.get_parameter(name) is empty[name] for name in expected), "a weight stayed loaded after its forward"
    assert not tied or not read
    if not tied:
        assert ("model.embed_tokens.weight", 9) in read  # the 9 distinct tokens, not the table
        head = [count for key, count in read if key == "lm_head.weight"]
        assert head == ([64] * 5 if head_blocks else [])
    assert not [m for m in deferred.modules() if "forward" in vars(m)], "a module kept its streamed forward"


@pytest.mark.parametrize("scheme", ["int4-sym", "int4-asym", "int8-per_channel", "int8-per_tensor"])
def test_round_to_nearest_by_row_blocks_equals_the_whole_weight(scheme, monkeypatch):
    from planc.passes.quantize import weights

    kind, layout = scheme.split("-")
    fmt = (weights.WeightFormat("int4", "per_group", 32, layout == "sym", 127) if kind == "int4"
           else weights.WeightFormat("int8", layout, 32, True, 127))
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 37)[:, None]
    whole = weights.rtn(w, fmt)
    monkeypatch.setattr(weights, "RTN_BLOCK_ELEMENTS", 8 * 64)  # blocks of 8 rows of 64
    tensors, error = weights.rtn_by_rows(w, fmt)
    assert tensors.keys() == whole.tensors.keys()
    for key in tensors:
        torch.testing.assert_close(tensors[key], whole.tensors[key], rtol=0, atol=0)
    assert error == float((w - whole.w_hat).abs().max())


def _plan(tmp_path: Path, model_dir: Path, pipeline: str = "quantize Linear { scheme = int4, group_size = 32 }") -> Path:
    plan = tmp_path / "stream.plan"
    plan.write_text(
        f'model llama = hf("{model_dir}") {{ task = causal_lm }}\n'
        f"pipeline {{ {pipeline} }}\n"
        'target onnx { decode { prompts = ["one two", "three"], max_new_tokens = 6 }\n'
        "  verify { metric = top1, goal = \">= 0.5\" } }\n"
    )
    return plan


def _initializers(artifact: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i, base_dir=str(artifact)) for i in onnx.load(str(artifact / "model.onnx")).graph.initializer}


@pytest.mark.parametrize(("pipeline", "streams"), [
    ("quantize Linear { scheme = int4, group_size = 32 }", "int4"),
    ("quantize Linear { scheme = int8 }", "int8"),
    ("", "fp32"),
    ("quantize Linear { scheme = int4, method = gptq, calibration = stdlib }", "int4"),
    ("quantize Linear { scheme = int4, method = awq, calibration = stdlib }", "int4"),
    ("quantize Linear { scheme = int4, method = gptq, compensate = true, calibration = stdlib }", False),
    ("quantize Linear { scheme = int4, smooth = 0.5 }", False),
    ('prune Linear { method = magnitude, sparsity = 0.5 }\n  quantize Linear { scheme = int4 }', "int4"),
    ('prune Linear { method = wanda, calibration = "stdlib" }', "fp32"),
    ('prune Linear { method = magnitude, sparsity = 0.5, scope = global }\n  quantize Linear { scheme = int4 }', False),
    ('quantize Linear { scheme = int4 }\n  prune Linear { method = magnitude }', False),
])
def test_only_a_plan_that_reads_each_weight_once_streams(checkpoints, tmp_path, pipeline, streams):
    from planc.compiler.footprint import (PROJECTION_BYTES, calibration_bytes, fit_notes, plan_footprint, streamed_projections,
                                          streams_weights)
    from planc.compiler.validate import load_plan

    plan, _ = load_plan(_plan(tmp_path, checkpoints[False], pipeline))
    assert streamed_projections(plan) == (streams or None) and streams_weights(plan) is bool(streams)
    footprint = plan_footprint(plan)  # the memory prediction follows the build the plan gets
    assert footprint is not None and footprint.build == ("streamed" if streams else "decoder")
    assert footprint.projection_bytes == (PROJECTION_BYTES[streams] if streams else None)
    if streams and "calibration" in pipeline:  # the Hessian of the widest input (the MLP's down projection) on top
        config = json.loads((checkpoints[False] / "config.json").read_text())
        assert footprint.checkpoint.widest_input == config["intermediate_size"]
        uncalibrated = "quantize Linear { scheme = int4 }" if streams == "int4" else ""
        plain = plan_footprint(load_plan(_plan(tmp_path, checkpoints[False], uncalibrated))[0])
        assert footprint.peak_bytes == plain.peak_bytes + calibration_bytes(footprint.checkpoint, 32 * 128)
        assert footprint.seconds > plain.seconds
        notes = fit_notes(footprint)  # a refusal says what the calibration costs and what would fit instead
        assert "calibrated method" in notes[0] and notes[1].endswith(f"need about {plain.peak_bytes / 1e9:.1f} GB")


CALIBRATED = "calibration = stdlib, calibration_samples = 4"


PRUNE = 'prune Linear { method = %s, sparsity = 0.5, calibration = "stdlib", calibration_samples = 4 }\n  '


@pytest.mark.parametrize(("tied", "pipeline", "solver"), [
    (False, "quantize Linear { scheme = int4, group_size = 32 }", None),
    (True, "quantize Linear { scheme = int4, group_size = 32 }", None),
    (False, f"quantize Linear {{ scheme = int4, group_size = 32, method = gptq, {CALIBRATED} }}", "quantize.gptq:gptq_by_rows"),
    (True, f"quantize Linear {{ scheme = int4, group_size = 32, method = awq, {CALIBRATED} }}", "quantize.awq:search_alpha"),
    (False, PRUNE % "wanda" + "quantize Linear { scheme = int4, group_size = 32 }", "prune.wanda:wanda_mask"),
    (True, PRUNE % "sparsegpt", "prune.sparsegpt:sparsegpt"),
], ids=["rtn", "rtn-tied", "gptq", "awq-tied", "wanda-rtn", "sparsegpt-tied"])
def test_a_streamed_compile_writes_the_same_artifact_as_a_full_load(checkpoints, tied, pipeline, solver, tmp_path, monkeypatch):
    """Round-to-nearest reads each weight once; gptq, awq, wanda and sparsegpt read each one
    where the calibration walk reaches it (gptq: the later layers calibrated on the rounded
    earlier ones); pruned weights wait in the spill file until they are quantized or written.
    Either way the streamed compile's bytes are the full load's."""
    from planc.compiler import driver
    from planc.compiler.model import load as loading

    plan = _plan(tmp_path, checkpoints[tied], pipeline)
    deferred = []
    original = loading._load_hf
    monkeypatch.setattr(loading, "_load_hf", lambda source, defer=False: deferred.append(defer) or original(source, defer))
    solved = []
    if solver is not None:  # the method itself ran on the streamed weights
        module_name, name = solver.split(":")
        module = importlib.import_module(f"planc.passes.{module_name}")
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, **kwargs: solved.append(args[0]) or real(*args, **kwargs))
    streamed_result = driver.compile_plan(plan, tmp_path / "streamed")
    assert (len(solved) > 0) is (solver is not None)
    monkeypatch.setattr(driver, "streams_weights", lambda plan: False)
    full_result = driver.compile_plan(plan, tmp_path / "full")
    assert deferred == [True, False]  # the plan streamed the first compile only
    got, want = _initializers(streamed_result.artifact), _initializers(full_result.artifact)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert streamed_result.report["accuracy"] == full_result.report["accuracy"]
    assert streamed_result.report["decoder"]["quantization"] == ("int4" if "quantize" in pipeline else None)
    spec = json.loads((streamed_result.artifact / "decoder.json").read_text())
    assert (spec["tied_embedding"] is not None) is (tied and "quantize" in pipeline)  # the tied table found by value
    if "prune" in pipeline:
        assert any(s["name"] == "prune" and "50.0% sparsity" in s["summary"] for s in streamed_result.report["passes"])


@pytest.mark.parametrize("tied", [False, True])
def test_an_empty_pipeline_streams_the_checkpoint_into_an_exact_fp32_decoder(checkpoints, tied, tmp_path, monkeypatch):
    """No quantization: the exporter traces the deferred weights' empty storage, each initializer
    is bound to the checkpoint and written from there; the artifact computes the full load's
    logits, and the driver's own check (greedy tokens equal to eager's, or no artifact) passed."""
    from planc.backends.onnx.decoder.session import DecoderSession
    from planc.compiler import driver

    plan = _plan(tmp_path, checkpoints[tied], "")
    bound = []
    from planc.backends.onnx.decoder import exporter

    original = exporter.bind_deferred_weights
    monkeypatch.setattr(exporter, "bind_deferred_weights", lambda model, loaders: bound.append(original(model, loaders)) or bound[-1])
    streamed_result = driver.compile_plan(plan, tmp_path / "streamed")
    monkeypatch.setattr(driver, "streams_weights", lambda plan: False)
    full_result = driver.compile_plan(plan, tmp_path / "full")
    assert bound[0] > 0 and bound[1] == 0  # the full load had nothing deferred
    accuracy = streamed_result.report["accuracy"]
    assert accuracy["greedy_equal"] is True and accuracy["top1"] == 1.0 and accuracy["logits_max_rel_diff"] <= 1e-4
    assert streamed_result.report["decoder"]["quantization"] is None
    ids = np.asarray([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], np.int64)
    got = DecoderSession(streamed_result.artifact).logits(ids)
    want = DecoderSession(full_result.artifact).logits(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert sum(v.nbytes for v in _initializers(streamed_result.artifact).values()) == \
        sum(v.nbytes for v in _initializers(full_result.artifact).values())


def test_an_edited_deferred_weight_goes_to_the_spill_file_not_memory():
    """A pass's new value for a deferred weight (pruned, updated) is written to the spill file
    and read back where used; the graph keeps its never-written storage, a copied graph reads
    the same value, and a value of another shape is held like any tensor."""
    from planc.passes.graph_utils import DEFERRED_WEIGHTS, get_tensor, quiet_deepcopy, set_tensor, stored_tensor

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False)))
    empty = stored_tensor(gm, "0.weight")
    reads = []
    original = torch.randn(6, 8)
    gm.meta[DEFERRED_WEIGHTS] = {"0.weight": lambda: reads.append(1) or original.clone()}
    pruned = get_tensor(gm, "0.weight").masked_fill(original.abs() < 0.5, 0.0)
    set_tensor(gm, "0.weight", pruned)
    assert stored_tensor(gm, "0.weight") is empty and len(reads) == 1
    torch.testing.assert_close(get_tensor(gm, "0.weight"), pruned, rtol=0, atol=0)
    torch.testing.assert_close(get_tensor(quiet_deepcopy(gm), "0.weight"), pruned, rtol=0, atol=0)
    torch.testing.assert_close(get_tensor(gm, "0.weight").index_select(0, torch.tensor([1, 2, 4])),
                               gm.meta[DEFERRED_WEIGHTS]["0.weight"].rows(torch.tensor([1, 2, 4])), rtol=0, atol=0)
    assert len(reads) == 1  # read back from the spill file, not the checkpoint
    set_tensor(gm, "0.weight", pruned[:3])
    assert "0.weight" not in gm.meta[DEFERRED_WEIGHTS] and get_tensor(gm, "0.weight").shape == (3, 8)
