"""The GPU machine's scripts, proven on CPU before a GPU runs them: bench/gpu_train_check.sh runs
programs emitted by bench/prepare_gpu_checks.py (a tiny GPT, gloo, 4 steps), and
bench/gpu_onnx_check.py checks tiny artifacts against eager torch with `[auto]`'s CPU fallback.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_one_gpu_runs_data_parallel_programs_as_one_rank_and_says_why_the_others_skip():
    check = _bench("gpu_train_check")
    names = ["ddp", "fsdp_bf16", "fsdp_fp32", "tensor", "pipeline"]
    refused = (False, "NCCL WARN Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000")
    runs, skipped = check.device_plan(names, 1, refused)
    assert runs == {"ddp": 1, "fsdp_bf16": 1, "fsdp_fp32": 1}
    assert set(skipped) == {"tensor", "pipeline"}
    assert "needs 2 ranks and this machine has 1 GPU" in skipped["tensor"]
    assert "Duplicate GPU detected" in skipped["pipeline"]
    assert check.device_plan(names, 2, None) == ({n: 2 for n in names}, {})
    assert check.device_plan(names, 0, None) == ({n: 2 for n in names}, {})  # CPU: gloo, the plans' ranks


def test_mfu_counts_six_flops_per_parameter_and_token_over_the_used_gpus():
    programs = _bench("train_programs")
    size = programs.SIZES["gpt125m"]
    assert 120e6 < size.parameters < 135e6  # ~125M
    records = [{"step": s, "loss": 5.0 - s / 10, "tokens_per_s": 100_000.0} for s in range(1, 6)] + [{"event": "done"}]
    one = programs.summarize("ddp", records, 0, 1.0, 1, size, gpus=1)
    two = programs.summarize("ddp", records, 0, 1.0, 2, size, gpus=2)
    assert one["mfu"] == pytest.approx(6 * size.parameters * 100_000 / 989e12)
    assert two["mfu"] == pytest.approx(one["mfu"] / 2)
    assert "mfu" not in programs.summarize("ddp", records, 0, 1.0, 2, size, gpus=0)
    assert one["passed"] and not programs.summarize("ddp", records[:-1], 0, 1.0, 1, size)["passed"]  # no "done"


@pytest.mark.slow
def test_gpu_train_check_runs_the_prepared_programs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "bench/prepare_gpu_checks.py"), "--size", "smoke", "--only", "train",
                    "--out", str(tmp_path / "artifacts"), "--programs", "fsdp_bf16", "fsdp_fp32", "pipeline"],
                   check=True, env=env)
    out = tmp_path / "results"
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_train_check.sh"), str(tmp_path / "artifacts/train"), str(out),
                           "--names", "fsdp_bf16", "fsdp_fp32", "pipeline"],
                          env=dict(env, PYTHON=sys.executable), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "train.json").read_text())
    programs = {p["program"]: p for p in results["programs"]}
    assert set(programs) == {"fsdp_bf16", "fsdp_fp32", "pipeline"} and results["skipped"] == {}
    for program in programs.values():
        assert program["passed"] and program["steps"] == 4 and program["processes"] == 2
        assert program["last_loss"] < program["first_loss"]  # it trains
    # bf16 follows the fp32 twin closely over the steps both ran
    agreement = results["agreement"]
    assert agreement["steps"] == 4 and agreement["max_rel_diff"] < 0.01
    with open(out / "loss_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["fsdp_fp32"]) for r in rows] == pytest.approx(programs["fsdp_fp32"]["losses"], abs=1e-5)
    assert "bf16 vs fp32" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_gpu_onnx_check_runs_the_prepared_artifacts(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "bench/prepare_gpu_checks.py"), "--size", "smoke", "--only", "onnx",
                    "--out", str(tmp_path / "artifacts")], check=True, env=env)
    check = _bench("gpu_onnx_check")
    results = check.main([str(tmp_path / "artifacts/onnx"), "--results", str(tmp_path / "onnx.json")])
    rows = {r["artifact"]: r for r in results["rows"]}
    assert set(rows) == {"gpt_int4", "gpt_fp16", "minilm_int8", "minilm_fp16"}
    assert all(r["passed"] and r["tokens_per_s"] > 0 for r in rows.values())
    # [auto] resolves as planc does: CUDA only when this onnxruntime has it
    import onnxruntime as ort

    want = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    assert {r["provider"] for r in rows.values()} == {want}
    assert rows["gpt_int4"]["positions"] == len("def main(argv):\n    ") + 8 - 1  # prompt, then one per fed token
    assert rows["minilm_fp16"]["min_cosine"] > 0.999 and rows["gpt_fp16"]["top1_agreement"] > 0.95
    assert json.loads((tmp_path / "onnx.json").read_text())["rows"] == results["rows"]
