"""The GPT training programs that the torch-compatibility check and the GPU check run, and how
to run them and read what they wrote.

Standard library only: the GPU machine has torch but neither planc nor lark/pydantic, so the
programs are emitted beforehand by `bench/prepare_gpu_checks.py` (which renders the plans below)
and this module only launches them with torchrun and reads their `metrics.jsonl`.

    python bench/train_programs.py run DIR NAME... [--python PY] [--nproc N] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The GPU machine's bf16 dense peak (H100 SXM; the H200 has the same compute), for MFU.
BF16_PEAK_FLOPS = 989e12


@dataclass(frozen=True)
class Size:
    """The GPT and the run length: `gpt125m` for the GPU, `smoke` for a CPU proof of the same code."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    micro_batch: int
    steps: int
    max_bytes: int
    eval_sequences: int

    @property
    def parameters(self) -> int:
        """N of the GPT in examples/models/gpt.py: 12·d² + 13·d per block, byte embeddings,
        learned positions, final norm and an untied 256-way head."""
        d = self.d_model
        return self.n_layer * (12 * d * d + 13 * d) + 256 * d + self.seq_len * d + 2 * d + 256 * d


SIZES = {
    # 18 blocks of width 768 (GPT-2 small's) with a byte vocabulary: 128.8M parameters.
    "gpt125m": Size(n_layer=18, n_head=12, d_model=768, seq_len=1024, micro_batch=8, steps=100,
                    max_bytes=8_000_000, eval_sequences=32),
    "smoke": Size(n_layer=2, n_head=4, d_model=64, seq_len=64, micro_batch=4, steps=4,
                  max_bytes=200_000, eval_sequences=8),
}


@dataclass(frozen=True)
class Program:
    """One `target train` variant: its strategy line and the processes it needs."""

    strategy: str
    precision: str
    ranks: int
    activation_checkpointing: bool = False

    @property
    def pipeline(self) -> bool:
        return self.strategy == "pipeline"


#: Every program the checks run. fsdp_fp32 is fsdp_bf16 in full precision: the reference that
#: the bf16 loss curve is compared with (same seed, same data order, same initial weights).
PROGRAMS = {
    "ddp": Program("ddp", "bf16", ranks=2),
    "fsdp_bf16": Program("fsdp", "bf16", ranks=2, activation_checkpointing=True),
    "fsdp_fp32": Program("fsdp", "fp32", ranks=2, activation_checkpointing=True),
    "tensor": Program("tensor", "bf16", ranks=2),
    "pipeline": Program("pipeline", "bf16", ranks=2),
}


def plan_text(name: str, size: Size, factory: str) -> str:
    """The .plan of program `name` at `size`; `factory` is the path of examples/models/gpt.py
    relative to the plan's folder."""
    program = PROGRAMS[name]
    pipeline = "pipeline {\n  partition { stages = 2, balance = params }\n}\n\n" if program.pipeline else ""
    schedule = '  pipeline { schedule = "1f1b", microbatches = 4 }\n' if program.pipeline else ""
    return (
        f"# planc bench: {name} ({program.strategy}, {program.precision}) of a "
        f"{size.parameters / 1e6:.1f}M-parameter GPT, seq {size.seq_len}.\n"
        f'model gpt = factory("{factory}:gpt", n_layer = {size.n_layer}, n_head = {size.n_head}, '
        f"d_model = {size.d_model}, max_seq = {size.seq_len}) {{\n"
        "  task = causal_lm\n"
        "  inputs { input_ids: int64[batch, seq] }\n"
        "}\n\n"
        f"{pipeline}"
        "target train {\n"
        f"  strategy = [{program.strategy}]\n"
        f"  world_size = {program.ranks}\n"
        f"  precision = {program.precision}\n"
        f"  activation_checkpointing = {str(program.activation_checkpointing).lower()}\n"
        f"  micro_batch = {size.micro_batch}\n"
        f"  steps = {size.steps}\n"
        "  log_every = 1\n"
        f"  eval_sequences = {size.eval_sequences}\n"
        "  optimizer { name = adamw, lr = 0.0006, weight_decay = 0.1 }\n"
        "  schedule { warmup = 10, decay = cosine }\n"
        f"  data {{ path = stdlib, seq_len = {size.seq_len}, max_bytes = {size.max_bytes} }}\n"
        f"  checkpoint {{ every = {size.steps + 1} }}\n"
        f"{schedule}"
        "}\n"
    )


def run_program(folder: Path, python: str, nproc: int, log_file: Path, timeout: float) -> tuple[int, float]:
    """Launch an emitted program's launch.sh with `python`'s torchrun and `nproc` processes;
    (exit code, seconds). A fresh run: the plans save no checkpoints, and old metrics go first."""
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    python = os.path.abspath(shutil.which(python) or python)  # launch.sh runs from the program's folder
    env = dict(os.environ, NPROC_PER_NODE=str(nproc), TORCHRUN=f"{python} -m torch.distributed.run",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            code = subprocess.run(["bash", str(folder / "launch.sh")], env=env, cwd=folder, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def read_metrics(folder: Path) -> list[dict]:
    """The records of the program's metrics.jsonl (empty if it wrote none)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(name: str, records: list[dict], code: int, seconds: float, nproc: int, size: Size | None,
              gpus: int = 0) -> dict:
    """Steps, first/last loss, tokens/s (median of the steps after the first two), pass/fail, and
    on `gpus` GPUs the MFU: 6·N·tokens/s over their bf16 dense peak."""
    steps = [r for r in records if "loss" in r and "step" in r and "event" not in r]
    done = any(r.get("event") == "done" for r in records)
    losses = [r["loss"] for r in steps]
    finite = all(loss == loss and abs(loss) != float("inf") for loss in losses)
    rates = sorted(r["tokens_per_s"] for r in steps[2:]) or sorted(r["tokens_per_s"] for r in steps)
    tokens_per_s = rates[len(rates) // 2] if rates else None
    result = {
        "program": name,
        "processes": nproc,
        "exit_code": code,
        "seconds": round(seconds, 1),
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "tokens_per_s": tokens_per_s,
        "losses": losses,
        "passed": code == 0 and done and bool(losses) and finite,
    }
    if size is not None and tokens_per_s and gpus:
        result["mfu"] = 6 * size.parameters * tokens_per_s / (BF16_PEAK_FLOPS * gpus)
    return result


def loss_agreement(reference: list[float], other: list[float], steps: int = 100) -> dict:
    """How closely `other` follows `reference` over their first `steps` steps."""
    pairs = list(zip(reference[:steps], other[:steps]))
    if not pairs:
        return {"steps": 0}
    gaps = [abs(a - b) for a, b in pairs]
    relative = [abs(a - b) / abs(a) for a, b in pairs if a]
    return {
        "steps": len(pairs),
        "max_abs_diff": max(gaps),
        "mean_abs_diff": sum(gaps) / len(gaps),
        "max_rel_diff": max(relative) if relative else None,
        "final_rel_diff": relative[-1] if relative else None,
    }


def run_all(folder: Path, names: list[str], python: str, nproc: dict[str, int] | None, size: str,
            timeout: float, gpus: int = 0) -> dict:
    """Run the programs emitted under `folder` one after another (`nproc` processes each, default
    the plan's); their summaries, and the torch. `gpus` > 0: one GPU per process, for MFU."""
    results = {"torch": torch_version(python), "size": size, "programs": []}
    for name in names:
        ranks = (nproc or {}).get(name, PROGRAMS[name].ranks)
        code, seconds = run_program(folder / name, python, ranks, folder / name / "run.log", timeout)
        summary = summarize(name, read_metrics(folder / name), code, seconds, ranks, SIZES[size], min(gpus, ranks))
        if not summary["passed"]:  # the reason, where the results go (the program folder may stay behind)
            summary["log_tail"] = (folder / name / "run.log").read_text(errors="replace").splitlines()[-40:]
        print(f"{name}: {'ok' if summary['passed'] else 'FAILED'} ({ranks} processes, {summary['steps']} steps, "
              f"loss {summary['first_loss']} -> {summary['last_loss']}, {seconds:.0f} s)", flush=True)
        results["programs"].append(summary)
    return results


def torch_version(python: str) -> str:
    return subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run emitted programs and write a JSON summary")
    run.add_argument("folder", type=Path, help="where prepare_gpu_checks.py emitted the programs")
    run.add_argument("names", nargs="+", choices=sorted(PROGRAMS))
    run.add_argument("--python", default=sys.executable, help="the Python whose torch runs them")
    run.add_argument("--nproc", type=int, default=None, help="processes per program (default: the plan's)")
    run.add_argument("--size", choices=sorted(SIZES), default="smoke")
    run.add_argument("--timeout", type=float, default=600)
    run.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    nproc = {name: args.nproc for name in args.names} if args.nproc else None
    results = run_all(args.folder, args.names, args.python, nproc, args.size, args.timeout)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(0 if all(p["passed"] for p in results["programs"]) else 1)


if __name__ == "__main__":
    main()
