"""The compile's memory is predicted from the checkpoint's headers, before anything loads.

References: the tensors themselves (loaded by safetensors) for the header reader; the plan's
`model` line for the refusal; the process's own peak RSS for the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planc.compiler.footprint import read_checkpoint
from planc.dsl.source import PlanError


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_headers_count_every_parameter_and_byte(gpt2_dir):
    tensors = _tensors(gpt2_dir)
    checkpoint = read_checkpoint(gpt2_dir)
    assert checkpoint is not None
    assert checkpoint.params == sum(t.numel() for t in tensors.values())
    assert checkpoint.stored_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert checkpoint.largest == max(t.numel() for t in tensors.values())


def test_sharded_bf16_checkpoint_is_read_through_its_index(gpt2_model, tmp_path):
    import torch

    model = type(gpt2_model)(gpt2_model.config).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tensors = _tensors(tmp_path)
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint is not None and len(list(tmp_path.glob("*.safetensors"))) > 1
    assert checkpoint.params == sum(t.numel() for t in tensors.values())
    assert checkpoint.dtypes == {"BF16": checkpoint.params}
    assert checkpoint.stored_bytes == 2 * checkpoint.params
    assert checkpoint.fp32_bytes == 4 * checkpoint.params


def test_config_only_directory_has_no_prediction(gpt2_model, tmp_path):
    gpt2_model.config.save_pretrained(tmp_path)
    assert read_checkpoint(tmp_path) is None


def _plan(tmp_path: Path, model_dir: Path) -> Path:
    plan = tmp_path / "decoder.plan"
    plan.write_text(
        "# a decoder from a checkpoint\n"
        f'model big = hf("{model_dir}") {{ task = causal_lm }}\n'
        "pipeline { quantize Conv1D | name(\"lm_head\") { scheme = int4, group_size = 32 } }\n"
        "target onnx { decode { prompts = [\"def main(\"], max_new_tokens = 4 } }\n"
    )
    return plan


def test_a_compile_that_does_not_fit_is_refused_at_the_model_line(gpt2_dir, tmp_path, monkeypatch):
    from planc.compiler.driver import compile_plan

    monkeypatch.setenv("PLANC_AVAILABLE_MEMORY", str(10**6))  # 1 MB free
    out = tmp_path / "out"
    with pytest.raises(PlanError) as raised:
        compile_plan(_plan(tmp_path, gpt2_dir), out)
    (diagnostic,) = raised.value.diagnostics
    assert diagnostic.span.line == 2 and diagnostic.span.col == 1
    assert "does not fit this machine's memory" in diagnostic.message and "GB" in diagnostic.message
    assert not out.exists()


def test_a_pruning_compile_without_disk_for_its_spill_file_is_refused_at_the_model_line(gpt2_dir, tmp_path, monkeypatch):
    """A streamed compile that prunes keeps the pruned weights in a temporary file: it needs
    4 bytes per projection weight of free temporary disk, checked before anything loads."""
    from planc.compiler import footprint
    from planc.compiler.driver import compile_plan

    plan = _plan(tmp_path, gpt2_dir)
    plan.write_text(plan.read_text().replace("pipeline { ", 'pipeline { prune Conv1D { method = magnitude, sparsity = 0.5 }\n  '))
    monkeypatch.setattr(footprint, "spill_room", lambda: 1000)
    with pytest.raises(PlanError) as raised:
        compile_plan(plan, tmp_path / "out")
    (diagnostic,) = raised.value.diagnostics
    checkpoint = footprint.read_checkpoint(gpt2_dir)
    assert diagnostic.span.line == 2 and f"need {4 * checkpoint.projection_params / 1e9:.1f} GB of temporary disk" in diagnostic.message
    assert any("TMPDIR" in note for note in diagnostic.notes)
    assert not (tmp_path / "out").exists()


def test_the_cli_says_so_without_a_traceback(gpt2_dir, tmp_path):
    env = {"PLANC_AVAILABLE_MEMORY": "1000000", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "planc.compiler.cli", "compile", str(_plan(tmp_path, gpt2_dir)),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "decoder.plan:2:1: error: model 'big' does not fit" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    explained = subprocess.run([sys.executable, "-m", "planc.compiler.cli", "explain", str(_plan(tmp_path, gpt2_dir))],
                               capture_output=True, text=True, env=env, timeout=300)
    assert explained.returncode == 0
    assert "predicted peak memory" in explained.stdout and "does NOT fit" in explained.stdout


def test_the_report_records_measured_peak_beside_the_prediction(gpt2_dir, tmp_path):
    from planc.compiler.driver import compile_plan
    from planc.compiler.footprint import peak_rss

    result = compile_plan(_plan(tmp_path, gpt2_dir), tmp_path / "out")
    on_disk = json.loads((result.artifact / "report.json").read_text())["memory"]
    assert on_disk == result.report["memory"]
    checkpoint = read_checkpoint(gpt2_dir)
    assert on_disk["params"] == checkpoint.params
    assert 0 < on_disk["measured_peak_bytes"] <= peak_rss()
    assert on_disk["predicted_peak_bytes"] > 4 * checkpoint.params
