"""planc's decoder artifacts next to ONNX Runtime GenAI's model builder, on one Llama-config model.

The model is `bench/llama_stdlib.py`'s (8 layers, width 512, 8 query / 4 key-value heads, RoPE,
RMSNorm, SwiGLU, 25.4M parameters, trained on standard-library sources). Each row is one
artifact: planc's exports (int4 with fp32 or int8 compute inside MatMulNBits, int8, fp32) and the
builder's (`python -m onnxruntime_genai.models.builder -p int4|int8|fp32 -e cpu`). Columns:

- MB: the model files on disk;
- top-1 / perplexity: next-token agreement with the fp32 eager model and perplexity, on
  held-out windows of the training text (never trained on), one cache-less call per batch;
- tok/s b1 / b8: greedy generation of `--new-tokens` after a `--prompt-len`-byte prompt
  (prefill included), every artifact driven by the same loop (`decode_drivers.GraphLoop`), each
  with the key/value buffer its tool's runtime uses, variants interleaved, median of
  `--repeats` (each round starting one variant later), a short pause between runs; all loop
  runs before all own-runtime runs;
- own b1 / own b8: the same generation in each tool's own runtime (planc's `generate_ids`,
  ONNX Runtime GenAI's `og.Generator`, whose session options cannot turn thread spinning off);
- a second table: CPU time of the process per token in the same runs, less sensitive than
  wall time to other work on a shared machine (spinning threads show up there too).

The builder rows need `onnxruntime_genai` importable by this interpreter (install it in a
separate environment: it pins its own onnxruntime); without it they are skipped with one line.

    python bench/bench_builder.py --json bench/results/builder.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import decode_drivers as drivers  # noqa: E402
import llama_stdlib  # noqa: E402

#: Seconds between timed runs, for threads still spinning from the previous run to park.
_SETTLE = 0.05
PLANC_VARIANTS = ["planc int4 (int8 compute)", "planc int4 (fp32 compute)", "planc int8", "planc fp32"]
BUILDER_VARIANTS = ["builder int4", "builder int8", "builder fp32"]


def has_genai() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def build_planc(model, out: Path, variant: str) -> Path:
    from planc.backends.onnx import int4_compute
    from planc.backends.onnx.decoder.exporter import MODEL_FILE, export_decoder

    scheme = variant.split()[1]
    export_decoder(model, out, quantize=None if scheme == "fp32" else scheme)
    if "int8 compute" in variant:
        int4_compute.with_compute(out / MODEL_FILE, out / MODEL_FILE, "int8")
    return out


def build_with_builder(hf_dir: Path, out: Path, precision: str) -> Path:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.parent / ".builder_cache")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "model.onnx").exists():
        raise RuntimeError(f"the builder failed ({precision}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return out


def model_megabytes(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model.onnx")) / 1e6


def shares_buffer(directory: Path) -> bool:
    """Whether the tool's own runtime binds one buffer as past and present for this artifact."""
    genai = directory / "genai_config.json"
    if genai.exists():
        return bool(json.loads(genai.read_text())["search"].get("past_present_share_buffer"))
    return json.loads((directory / "decoder.json").read_text()).get("kv_buffer") == "shared"


def own_runtime(directory: Path, prompts: np.ndarray, new_tokens: int, threads: int):
    """A function running the artifact's own tool's generation loop; returns the new ids."""
    if (directory / "genai_config.json").exists():
        return drivers.genai_generate(directory, prompts, new_tokens, threads)
    from planc.backends.onnx.decoder.generate import generate_ids
    from planc.backends.onnx.decoder.session import DecoderSession

    session = DecoderSession(directory, providers=["cpu"], threads=threads)
    return lambda: np.asarray(generate_ids(session, prompts.tolist(), new_tokens, eos_token_ids=[]))


def timed(run) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds of this process's threads, tokens) of one generation."""
    cpu, started = time.process_time(), time.perf_counter()
    tokens = run()
    return time.perf_counter() - started, time.process_time() - cpu, tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="save_pretrained directory (default: bench/llama_stdlib.py's trained model)")
    parser.add_argument("--out", default=str(REPO / "out" / "bench_builder"), help="where the artifacts are built")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 128 bytes for top-1 / perplexity")
    parser.add_argument("--variants", nargs="+", default=PLANC_VARIANTS + BUILDER_VARIANTS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from planc.backends.onnx.decoder.exporter import load_hf_decoder

    recipe = llama_stdlib.Recipe()
    hf_dir = Path(args.model) if args.model else llama_stdlib.trained_model_dir(recipe)
    model = load_hf_decoder(hf_dir)
    config = model.config
    layout = drivers.Layout(config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
    variants = list(args.variants)
    if any(v.startswith("builder") for v in variants) and not has_genai():
        print("onnxruntime_genai is not importable here: skipping the builder rows")
        variants = [v for v in variants if not v.startswith("builder")]

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    artifacts: dict[str, Path] = {}
    for variant in variants:
        directory = out / variant.replace(" ", "_").replace("(", "").replace(")", "")
        if variant.startswith("planc"):
            artifacts[variant] = build_planc(model, directory, variant)
        else:
            artifacts[variant] = build_with_builder(hf_dir, directory, variant.split()[1])

    held = llama_stdlib.heldout_windows(recipe, args.windows)[:, :128].numpy()
    with torch.no_grad():
        reference = model(torch.from_numpy(held)).logits.float().numpy()
    eager = drivers.next_token_metrics(reference, reference, held)
    rows: dict[str, dict] = {v: {"variant": v, "mb": round(model_megabytes(d), 1)} for v, d in artifacts.items()}
    for variant, directory in artifacts.items():
        loop = drivers.GraphLoop(directory / "model.onnx", layout, args.threads, shares_buffer(directory))
        logits = np.concatenate([loop.score(held[i : i + 8]) for i in range(0, len(held), 8)])
        rows[variant].update(drivers.next_token_metrics(logits, reference, held))

    for batch in args.batch:
        prompts = held[:batch, : args.prompt_len]
        runners: dict[tuple[str, str], object] = {}
        for variant, directory in artifacts.items():
            loop = drivers.GraphLoop(directory / "model.onnx", layout, args.threads, shares_buffer(directory))
            runners[(variant, "loop")] = lambda loop=loop: loop.generate(prompts, args.new_tokens)
            runners[(variant, "own")] = own_runtime(directory, prompts, args.new_tokens, args.threads)
        seconds: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in runners}
        outputs = {key: timed(run)[2] for key, run in runners.items()}  # warm-up
        # The shared loop's rows first, then the own runtimes': og.Generator's thread pool spins
        # after each run (its config cannot turn that off), which slowed whatever ran next.
        # Each round starts one variant later, so that no variant always follows the same one.
        for kind in ("loop", "own"):
            order = [key for key in runners if key[1] == kind]
            for round_ in range(args.repeats):
                for key in order[round_ % len(order):] + order[: round_ % len(order)]:
                    seconds[key].append(timed(runners[key])[:2])
                    time.sleep(_SETTLE)
        for (variant, kind), times in seconds.items():
            tokens = batch * args.new_tokens
            rows[variant][f"{kind}_b{batch}"] = round(tokens / statistics.median(t for t, _ in times), 1)
            rows[variant][f"{kind}_cpu_ms_b{batch}"] = round(1e3 * statistics.median(c for _, c in times) / tokens, 3)
        for variant in artifacts:
            rows[variant][f"loops_agree_b{batch}"] = bool(np.array_equal(outputs[(variant, "loop")], outputs[(variant, "own")]))

    results = {
        "model": str(hf_dir), "params": sum(p.numel() for p in model.parameters()), "threads": args.threads,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "cpu": cpu_line(), "eager_perplexity": eager["perplexity"], "rows": list(rows.values()),
    }
    print(markdown(results, args.batch))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def cpu_line() -> str:
    model, flags = platform.processor() or "unknown CPU", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, avx512_vnni {'present' if 'avx512_vnni' in flags.split() else 'absent'}"


def markdown(results: dict, batches: list[int]) -> str:
    speed = [f"tok/s b{b}" for b in batches] + [f"own b{b}" for b in batches]
    lines = [f"{results['params'] / 1e6:.1f}M params, {results['threads']} threads, prompt {results['prompt_len']}, "
             f"{results['new_tokens']} greedy tokens, median of {results['repeats']}; {results['cpu']}; "
             f"eager fp32 perplexity {results['eager_perplexity']:.2f}", "",
             "| variant | MB | top-1 | perplexity | " + " | ".join(speed) + " |",
             "|---|" + "---|" * (3 + len(speed))]
    for row in results["rows"]:
        cells = [f"{row[f'loop_b{b}']:.0f}" for b in batches] + [
            f"{row[f'own_b{b}']:.0f}" + ("" if row[f"loops_agree_b{b}"] else " *") for b in batches]
        lines.append(f"| {row['variant']} | {row['mb']} | {row['top1']:.3f} | {row['perplexity']:.2f} | " + " | ".join(cells) + " |")
    if any(not row[f"loops_agree_b{b}"] for row in results["rows"] for b in batches):
        lines.append("\n\\* the tool's own runtime generated other tokens than the shared loop")
    cpu = [f"{kind} b{b}" for kind in ("loop", "own") for b in batches]
    lines += ["", "CPU milliseconds per token (all of the process's threads; the same runs, median):", "",
              "| variant | " + " | ".join(cpu) + " |", "|---|" + "---|" * len(cpu)]
    for row in results["rows"]:
        lines.append(f"| {row['variant']} | " + " | ".join(f"{row[f'{kind}_cpu_ms_b{b}']:.2f}" for kind in ("loop", "own") for b in batches) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
