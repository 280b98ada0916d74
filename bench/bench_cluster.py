"""4-bit weight clustering against int4 quantization on MiniLM: file, memory, accuracy, speed, one run.

Compiles `examples/minilm_cluster4.plan` and `examples/minilm_int4.plan` through the planc
driver (their own verify gates run) and exports the unmodified model, then reports per variant:

- file size of the ONNX model;
- held-out accuracy from the artifact's report (min / mean cosine and similarity Spearman against
  eager fp32 over `examples/data/dev_sentences.txt`, as the plans' verify blocks measure it);
- resident memory of a fresh process after it loads the model and runs it once (VmRSS growth,
  and VmHWM, the peak): this is where ONNX Runtime's load-time constant folding of the codebook
  lookups shows, whatever the file holds;
- latency at batch 1, seq 128, 2 threads, median of interleaved rounds (`timing.py`).

The clustered artifact is also loaded a second way, with ORT's `ConstantFolding` disabled, so
that the lookups stay in the graph and rebuild every weight on every run: compact in memory,
slower per call. That variant is a measurement, not something planc builds.

    python bench/bench_cluster.py --rounds 30 --json cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CPU = ["CPUExecutionProvider"]
PLANS = ["examples/minilm_cluster4.plan", "examples/minilm_int4.plan"]
THREADS, BATCH, SEQ = 2, 1, 128


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _session(model: Path, fold: bool):
    from planc.backends.onnx import runtime
    from planc.backends.onnx.cluster_lowering import SAVE_DISABLED_OPTIMIZERS

    disabled = () if fold else SAVE_DISABLED_OPTIMIZERS
    return runtime.create_session(model, CPU, THREADS, "all", disabled_optimizers=disabled)


def measure_memory(model: Path, fold: bool) -> dict[str, float]:
    """In this (fresh) process: MB of resident memory added by loading `model` and one run."""
    import numpy as np

    from planc.backends.onnx import runtime

    before = _status_kib("VmRSS")
    session = _session(model, fold)
    loaded = _status_kib("VmRSS")
    ids = np.full((BATCH, SEQ), 1000, dtype=np.int64)
    runtime.run(session, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return {
        "rss_after_load_mb": round((loaded - before) / 1024, 1),
        "rss_after_run_mb": round((_status_kib("VmRSS") - before) / 1024, 1),
        "peak_rss_mb": round(_status_kib("VmHWM") / 1024, 1),
    }


def _memory_in_fresh_process(model: Path, fold: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--memory", str(model)] + ([] if fold else ["--no-fold"])
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run(rounds: int, work: Path) -> dict:
    from bench.minilm_common import compile_plans, export_fp32, minilm_source
    from planc.backends.onnx import runtime
    from planc.backends.onnx.artifact import _bench_inputs, load_report
    from planc.backends.onnx.export import files_size
    from planc.backends.onnx.timing import interleaved_medians
    from planc.compiler import model as model_source

    loaded = model_source.load_model(minilm_source("bench_cluster"))
    built = compile_plans([str(REPO / p) for p in PLANS], work)
    models = {"ort fp32": export_fp32(loaded, work)}
    models.update(built)
    variants: dict[str, tuple[Path, bool]] = {name: (path, True) for name, path in models.items()}
    cluster_name = f"planc {Path(PLANS[0]).stem}"
    variants[f"{cluster_name}, no fold at load"] = (models[cluster_name], False)

    rows: dict[str, dict] = {}
    for name, (path, fold) in variants.items():
        row: dict = {"file_mb": round(files_size(path) / 1e6, 2)}
        if name in built:
            report = load_report(path.parent)
            accuracy = report["accuracy"]
            row.update(cos_min=round(accuracy["min"], 4), cos_mean=round(accuracy["mean"], 4),
                       spearman=round(accuracy.get("spearman") or 0.0, 4))
            if "cluster" in report:
                row["cluster_at_load"] = report["cluster"]
        print(f"memory of {name} ...", file=sys.stderr)
        row.update(_memory_in_fresh_process(path, fold))
        rows[name] = row

    inputs = _bench_inputs(loaded, BATCH, SEQ)
    sessions = {name: _session(path, fold) for name, (path, fold) in variants.items()}
    feeds = {name: runtime.feeds_for(s, inputs) for name, s in sessions.items()}
    print(f"timing {len(sessions)} variants, {rounds} interleaved rounds ...", file=sys.stderr)
    medians = interleaved_medians({name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}, rounds)
    for name, ms in medians.items():
        rows[name]["ms"] = round(ms, 2)
    return {"cpu": _cpu_name(), "threads": THREADS, "batch": BATCH, "seq": SEQ, "rounds": rounds, "variants": rows}


def render(result: dict) -> str:
    head = ("variant", "file MB", "RSS +load MB", "RSS +run MB", "ms", "cos min", "cos mean", "Spearman")
    lines = [f"MiniLM, {result['cpu']}, batch {result['batch']}, seq {result['seq']}, {result['threads']} threads, "
             f"median of {result['rounds']} interleaved rounds; accuracy on 80 held-out sentences",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["variants"].items():
        cells = [name, row["file_mb"], row["rss_after_load_mb"], row["rss_after_run_mb"], row.get("ms", "-"),
                 row.get("cos_min", "-"), row.get("cos_mean", "-"), row.get("spearman", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--memory", type=Path, help=argparse.SUPPRESS)  # the fresh-process probe
    parser.add_argument("--no-fold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory is not None:
        print(json.dumps(measure_memory(args.memory, fold=not args.no_fold)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        result = run(args.rounds, Path(tmp))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
