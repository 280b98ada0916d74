"""Prove that planc's emitted training programs run under another torch (the GPU machine's 2.11):
emit the DDP, FSDP2 + bf16 + activation checkpointing, tensor-parallel and pipeline (1F1B)
programs of a small GPT with this planc, run each for a few steps with gloo (2 processes) under
the other torch's Python, and record the torch API they use as that torch sees it.

    python3 -m venv /work/torch211 && /work/torch211/bin/python -m pip install torch==2.11.0 numpy
    .venv/bin/python bench/torch_compat_check.py --python /work/torch211/bin/python

Writes bench/results/torch211_programs.json (per program: steps, first/last loss, pass/fail,
the torch version) and tests/train/torch_2_11_api.json, the record the default test suite
checks planc_runtime against (tests/train/test_torch_api.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_gpu_checks import emit_training_programs  # noqa: E402
from train_programs import run_all  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ["ddp", "fsdp_bf16", "tensor", "pipeline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", required=True, help="the Python of the other torch")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "torch211_programs.json")
    parser.add_argument("--api", type=Path, default=REPO / "tests" / "train" / "torch_2_11_api.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="planc-compat-") as tmp:
        emit_training_programs(Path(tmp), "smoke", PROGRAMS)
        results = run_all(Path(tmp), PROGRAMS, args.python, None, "smoke", timeout=600)
    results["backend"] = "gloo (CPU)"
    results["command"] = f"bench/torch_compat_check.py --python {args.python}"
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    subprocess.run([args.python, str(REPO / "bench" / "torch_api.py"), "record", "--out", str(args.api)], check=True)
    print(f"wrote {args.results} and {args.api}")
    sys.exit(0 if all(p["passed"] for p in results["programs"]) else 1)


if __name__ == "__main__":
    main()
