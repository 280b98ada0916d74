#!/usr/bin/env bash
# Regenerate the README's measured figures from the current code, one bench after another on a
# quiet machine (time nothing while tests or other work run beside it). Each bench writes its
# results file under bench/results/ (bench/results/README.md maps figures to files); the MiniLM
# figures are scored on the test set, examples/data/test_sentences.txt, never used to choose.
#
#   bash bench/readme_figures.sh [--scale-builder PYTHON_WITH_ONNXRUNTIME_GENAI]
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
planc=.venv/bin/planc
builder=""
if [ "${1:-}" = "--scale-builder" ]; then builder="--builder-python $2"; fi
export PYTHONUNBUFFERED=1

# Inputs the benches read: the MiniLM int8 artifacts and the trained example GPT.
$planc compile examples/minilm_int8.plan -o out/minilm_int8
$planc compile bench/plans/minilm_int8_avx2.plan -o out/minilm_int8_avx2
$planc compile examples/gpt_decode_int8.plan -o out/gpt_int8      # trains first (cached)

# Benches that print their tables: the results file is a provenance header, then what they print.
run_to() {  # run_to FILE python bench/x.py ARGS...
    local file=$1; shift
    { $py bench/results_file.py "$*"; .venv/bin/"$@"; } | tee "$file"
}
run_to bench/results/minilm_int8.md python bench/bench_minilm.py out/minilm_int8 out/minilm_int8_avx2 --rounds 40 \
    --sentences examples/data/test_sentences.txt --count 100 --json bench/results/minilm_int8.json
run_to bench/results/int8_targets.md python bench/int8_targets.py examples/minilm_int8.plan
run_to bench/results/recovery.md python bench/bench_recovery.py --gpt out/gpt_int8/train/gpt_stdlib.pt --json bench/results/recovery.json
# Benches that write their own results files (bench/results_file.py).
$py bench/bench_decode.py --variants int8 --batch 1 8
$py bench/bench_int4_compute.py
$py bench/bench_speculative.py
$py bench/bench_ddp.py
run_to bench/results/cluster4_vs_int4.md python bench/bench_cluster.py --rounds 40 --json bench/results/cluster4_vs_int4.json
# shellcheck disable=SC2086
run_to bench/results/scale.md python bench/bench_scale.py --models qwen2.5-0.5b llama-3.2-1b llama-3.2-3b --fp32 llama-3.2-1b --gptq llama-3.2-1b --wanda llama-3.2-1b --root /tmp/planc_scale $builder \
    --json bench/results/scale.json
