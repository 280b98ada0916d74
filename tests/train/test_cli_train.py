"""`planc train` on a bundled example: compile the program, launch torchrun with 2 processes,
and check that the held-out loss fell and the trained weights were written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_planc_train_pipeline_example(tmp_path: Path) -> None:
    out = tmp_path / "pipeline"
    result = subprocess.run(
        [sys.executable, "-m", "planc.compiler.cli", "train", str(ROOT / "examples" / "gpt_train_pipeline.plan"), "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in events if e.get("event") == "eval"]
    assert len(evals) >= 2 and evals[-1] < 0.8 * evals[0]
    assert (out / "trained.pt").is_file() and (out / "train.py").is_file()
