"""planc on real-sized decoders: compile wall time, peak memory, artifact bytes and tokens/s.

For each public shape (`scale_models.CONFIGS`: Qwen2.5-0.5B, Llama-3.2-1B/3B, Llama-3.1-8B) a
random-init bf16 checkpoint is written tensor by tensor, then compiled by

- planc: `quantize Linear { scheme = int4, group_size = 32 }` in a decode target
  (`planc compile`, measured with `/usr/bin/time -v`: wall, peak RSS, exit status; a compile
  planc refuses before loading, because its predicted memory does not fit, is a row too);
- with `--fp32`, planc again with an empty pipeline: the checkpoint exported as it is, streamed
  into an fp32 artifact and held by the streaming verifier to the eager model (greedy tokens
  equal, top-1 agreement and the largest relative logit difference in the outcome column); not
  timed in the tokens/s loop (an fp32 decoder is the baseline, not a candidate);
- with `--gptq`, planc again with `method = gptq, calibration = stdlib`: calibrated weights
  streamed through GPTQ a layer at a time (its memory against the same bound; not timed in the
  loop either: its graph is the round-to-nearest one's);
- with `--wanda`, planc again with the projections pruned 50% by wanda (stdlib calibration)
  before int4: pruned weights spilled to a temporary file and read back to be quantized (its
  memory against the same bound; not timed either: zeros stored dense decode at int4's speed);
- ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder -i DIR -o OUT
  -p int4 -e cpu`), when `--builder-python` names an interpreter that imports
  `onnxruntime_genai` (it pins its own onnxruntime, so it lives in its own environment);
  otherwise its rows are skipped with one line.

Tokens/s come from one loop (`decode_drivers.GraphLoop`) driving every artifact that was built,
prompt `--prompt-len` random ids, `--new-tokens` greedy tokens, 2 threads, variants interleaved
(each round starting one variant later), median of `--repeats`. Random weights say nothing about
accuracy; they measure memory, time and size.

    python bench/bench_scale.py --models qwen2.5-0.5b llama-3.2-1b --builder-python /path/to/genai/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

import decode_drivers as drivers  # noqa: E402
import scale_models  # noqa: E402

PLAN = """\
# written by bench/bench_scale.py: {what} of a random-init {name} checkpoint
model {ident} = hf("{directory}") {{
  task = causal_lm
}}

pipeline {{
{pipeline}}}

target onnx {{
  decode {{ prompts = ["def main(", "import os\\n"], max_new_tokens = 8 }}
  verify {{ metric = top1, goal = {goal} }}
}}
"""
#: tool -> (what, pipeline, goal): random weights say nothing about int4 accuracy (no goal),
#: while an fp32 export must reproduce the eager model.
PLANC_VARIANTS = {
    "planc": ("int4 weight-only decoder", "  quantize Linear { scheme = int4, group_size = 32 }\n", "none"),
    "planc fp32": ("fp32 decoder (no pipeline)", "", '">= 1.0"'),
    "planc gptq": ("int4 GPTQ decoder", "  quantize Linear { scheme = int4, group_size = 32, method = gptq, calibration = stdlib }\n", "none"),
    "planc wanda": ("int4 decoder pruned 50% by wanda",
                    '  prune Linear - name("lm_head") { method = wanda, sparsity = 0.5, calibration = "stdlib" }\n'
                    "  quantize Linear { scheme = int4, group_size = 32 }\n", "none"),
}
#: The variants the tokens/s loop drives (the others are not candidates: an fp32 baseline, and
#: a GPTQ artifact whose graph is the round-to-nearest one's).
TIMED = ("planc", "builder")


def timed_command(command: list[str], log: Path) -> dict:
    """Run `command` under `/usr/bin/time -v`: exit status, wall seconds, peak RSS bytes, its output."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(done.stdout + "\n" + done.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    killed = "Command terminated by signal" in done.stderr
    return {"status": done.returncode, "killed": killed, "wall_s": round(wall, 1),
            "peak_rss_bytes": int(peak.group(1)) * 1024 if peak else None,
            "message": _first_error(done.stderr)}


def _first_error(text: str) -> str | None:
    for line in text.splitlines():
        if ": error: " in line or line.startswith("planc: "):
            return line.strip()
    return None


def artifact_bytes(directory: Path) -> int | None:
    files = [p for p in directory.glob("model.onnx*")] if directory.is_dir() else []
    return sum(p.stat().st_size for p in files) or None


def compile_planc(name: str, checkpoint: Path, out: Path, logs: Path, variant: str = "planc") -> dict:
    what, pipeline, goal = PLANC_VARIANTS[variant]
    stem = f"{name}.{variant.replace(' ', '-')}"
    plan = logs / f"{stem}.plan"
    plan.write_text(PLAN.format(what=what, name=name, ident=re.sub(r"\W", "_", name), directory=checkpoint,
                                pipeline=pipeline, goal=goal))
    shutil.rmtree(out, ignore_errors=True)
    row = timed_command([str(Path(sys.executable).with_name("planc")), "compile", str(plan), "-o", str(out)],
                        logs / f"{stem}.log")
    report = out / "report.json"
    if report.exists():
        written = json.loads(report.read_text())
        row["memory"] = written.get("memory")
        row["accuracy"] = {k: written["accuracy"].get(k) for k in ("greedy_equal", "top1", "logits_max_rel_diff")}
    row["artifact_bytes"] = artifact_bytes(out)
    return row


def compile_builder(python: str, checkpoint: Path, out: Path, logs: Path, name: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    row = timed_command([python, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                         "-p", "int4", "-e", "cpu", "-c", str(out.parent / f".{out.name}_cache")], logs / f"{name}.builder.log")
    shutil.rmtree(out.parent / f".{out.name}_cache", ignore_errors=True)
    row["artifact_bytes"] = artifact_bytes(out)
    return row


def has_genai(python: str | None) -> bool:
    if not python:
        return False
    return subprocess.run([python, "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0


def shares_buffer(directory: Path) -> bool:
    genai = directory / "genai_config.json"
    if genai.exists():
        return bool(json.loads(genai.read_text())["search"].get("past_present_share_buffer"))
    return json.loads((directory / "decoder.json").read_text()).get("kv_buffer") == "shared"


def tokens_per_s(artifacts: dict[str, Path], config: dict, batches: list[int], prompt_len: int, new_tokens: int,
                 repeats: int, threads: int) -> dict[str, dict[int, float]]:
    """One loop drives every artifact, interleaved, each round starting one variant later."""
    heads = config["num_attention_heads"]
    layout = drivers.Layout(config["num_hidden_layers"], config["num_key_value_heads"],
                            config.get("head_dim") or config["hidden_size"] // heads)
    rng = np.random.default_rng(0)
    speeds: dict[str, dict[int, float]] = {v: {} for v in artifacts}
    loops = {v: drivers.GraphLoop(d / "model.onnx", layout, threads, shares_buffer(d)) for v, d in artifacts.items()}
    for batch in batches:
        prompts = rng.integers(1, 256, size=(batch, prompt_len), dtype=np.int64)
        for loop in loops.values():
            loop.generate(prompts, 2)  # warm-up
        seconds: dict[str, list[float]] = {v: [] for v in loops}
        order = list(loops)
        for round_ in range(repeats):
            for variant in order[round_ % len(order):] + order[: round_ % len(order)]:
                started = time.perf_counter()
                loops[variant].generate(prompts, new_tokens)
                seconds[variant].append(time.perf_counter() - started)
                time.sleep(0.05)
        for variant, times in seconds.items():
            speeds[variant][batch] = round(batch * new_tokens / statistics.median(times), 1)
    return speeds


def markdown(results: dict) -> str:
    lines = [f"{results['cpu']}; prompt {results['prompt_len']}, {results['new_tokens']} greedy tokens, "
             f"{results['threads']} threads, median of {results['repeats']} interleaved rounds", "",
             "| checkpoint | tool | compile wall | peak RSS | predicted peak | artifact | tok/s b1 / b8 | outcome |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        gb = lambda v: f"{v / 1e9:.2f} GB" if v else "–"  # noqa: E731
        speed = row.get("tokens_per_s") or {}
        tok = " / ".join(f"{speed[str(b)] if str(b) in speed else speed.get(b, '–')}" for b in results["batches"]) if speed else "–"
        predicted = (row.get("memory") or {}).get("predicted_peak_bytes") or row.get("predicted_peak_bytes")
        accuracy = row.get("accuracy") or {}
        verified = (f"ok: greedy equal {accuracy['greedy_equal']}, top-1 {accuracy['top1']:.3f}, "
                    f"max rel. logit diff {accuracy['logits_max_rel_diff']:.1e}") if row["tool"] == "planc fp32" else "ok"
        outcome = verified if row["status"] == 0 else ("killed by the kernel" if row["killed"] else (row.get("message") or f"exit {row['status']}"))
        lines.append(f"| {row['checkpoint']} | {row['tool']} | {row['wall_s']:.0f} s | {gb(row['peak_rss_bytes'])} | "
                     f"{gb(predicted)} | {gb(row['artifact_bytes'])} | {tok} | {outcome} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(scale_models.CONFIGS), choices=list(scale_models.CONFIGS))
    parser.add_argument("--root", default="/tmp/planc_scale", help="checkpoints, artifacts and logs go here")
    parser.add_argument("--builder-python", help="an interpreter that imports onnxruntime_genai")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", nargs="*", default=[], choices=list(scale_models.CONFIGS),
                        help="also compile these checkpoints with an empty pipeline")
    parser.add_argument("--gptq", nargs="*", default=[], choices=list(scale_models.CONFIGS),
                        help="also compile these checkpoints with GPTQ calibrated on stdlib")
    parser.add_argument("--wanda", nargs="*", default=[], choices=list(scale_models.CONFIGS),
                        help="also compile these checkpoints pruned 50%% by wanda (stdlib), then int4")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from bench_builder import cpu_line

    root = Path(args.root)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    builder = has_genai(args.builder_python)
    if not builder:
        print("onnxruntime_genai is not importable by --builder-python: skipping the builder rows")
    rows = []
    for name in args.models:
        checkpoint = scale_models.write_checkpoint(name, root / "checkpoints" / name)
        tools = {"planc": lambda: compile_planc(name, checkpoint, root / "artifacts" / f"{name}-planc", logs)}
        for variant, selected in (("planc fp32", args.fp32), ("planc gptq", args.gptq), ("planc wanda", args.wanda)):
            if name in selected:
                tools[variant] = lambda variant=variant: compile_planc(
                    name, checkpoint, root / "artifacts" / f"{name}-{variant.replace(' ', '-')}", logs, variant)
        if builder:
            tools["builder"] = lambda: compile_builder(args.builder_python, checkpoint, root / "artifacts" / f"{name}-builder", logs, name)
        built: dict[str, Path] = {}
        for tool, run in tools.items():
            row = {"checkpoint": name, "tool": tool, **run()}
            print(f"{name} {tool}: {row}", flush=True)
            rows.append(row)
            if row["status"] == 0 and row["artifact_bytes"] and tool in TIMED:
                built[tool] = root / "artifacts" / f"{name}-{tool}"
        if built:
            speeds = tokens_per_s(built, scale_models.CONFIGS[name], args.batch, args.prompt_len, args.new_tokens,
                                  args.repeats, args.threads)
            for row in rows:
                if row["checkpoint"] == name and row["tool"] in speeds:
                    row["tokens_per_s"] = speeds[row["tool"]]
    results = {"cpu": cpu_line(), "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "batches": args.batch, "rows": rows}
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
