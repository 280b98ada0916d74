#!/usr/bin/env bash
# One command on the GPU machine: run the training programs that bench/prepare_gpu_checks.py
# emitted on a CPU machine (a 128.8M-parameter GPT at sequence length 1024: DDP, FSDP2 + bf16 +
# activation checkpointing and its fp32 twin, tensor parallel, pipeline 1F1B; nccl, 100 steps
# each) and write tokens/s, MFU, loss curves and the bf16-vs-fp32 loss agreement into OUT_DIR.
#
#   here:  .venv/bin/python bench/prepare_gpu_checks.py --only train
#   there: bash bench/gpu_train_check.sh [PROGRAMS_DIR] [OUT_DIR]
#          (defaults: bench/gpu_artifacts/train, $OUT or bench/results/gpu_train)
#
# It needs torch and the standard library only (no planc). PYTHON picks the interpreter
# (default python3). Without CUDA it runs the same programs on CPU over gloo: the smoke test
# (tests/train/test_gpu_scripts.py) prepares tiny programs and runs it that way.
set -euo pipefail
cd "$(dirname "$0")/.."

PROGRAMS_DIR="${1:-bench/gpu_artifacts/train}"
OUT_DIR="${2:-${OUT:-bench/results/gpu_train}}"
PYTHON="${PYTHON:-python3}"

if [ ! -f "$PROGRAMS_DIR/size.json" ]; then
    echo "no programs in $PROGRAMS_DIR: run bench/prepare_gpu_checks.py --only train on a machine with planc first" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.csv" || true
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" bench/gpu_train_check.py "$PROGRAMS_DIR" "$OUT_DIR" "${@:3}"
