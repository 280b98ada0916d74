"""Throughput of planc's generated DDP program against a minimal hand-written DDP loop.

Both train the example GPT with the same batch, AdamW and gradient clipping, on 2 processes
(gloo on CPU, nccl on GPU), under torchrun, each process with OMP_NUM_THREADS=1 unless set;
the table compares steady-state tokens/s (the first step, which warms up, is left out of both).
A round runs both programs once, in a freshly shuffled order; rounds are repeated for as long
as `--seconds` allows (one round at least) and the median of each program's tokens/s is kept,
so the ratio comes from one run. Target: generated >= 0.95x hand-written. Results:
bench/results/ddp.md and .json (`--out`, `--json`).

    python bench/bench_ddp.py [--seconds 180] [--steps 30] [--nproc 2] [--layers 4] [--d-model 128] [--seq 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import results_file  # noqa: E402

PROGRAMS = ("hand-written DDP loop", "planc generated train.py")


def hand_written_worker(args: argparse.Namespace) -> None:
    """The reference: what an engineer would type for DDP, and nothing else."""
    import importlib.util

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    spec = importlib.util.spec_from_file_location("gpt_model", REPO / "examples" / "models" / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpt_model"] = module
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.gpt(n_layer=args.layers, d_model=args.d_model, max_seq=args.seq).to(device).train()
    model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)
    batch = torch.randint(0, 256, (args.batch, args.seq + 1), device=device)
    start = 0.0
    for step in range(args.steps):
        if step == 1:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = args.batch * args.seq * dist.get_world_size() * (args.steps - 1)
    if dist.get_rank() == 0:
        print(json.dumps({"tokens_per_s": tokens / elapsed, "loss": loss.item()}), flush=True)
    # Every rank done with its collectives before the group is torn down: one slow-suite run saw
    # rank 0 abort in gloo's teardown ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: argparse.Namespace, script: list[str], cwd: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(script)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def emit_generated(args: argparse.Namespace, workdir: Path) -> Path:
    """The DDP program planc emits for the same model and batch, and its corpus."""
    from planc.backends.train.emit import emit_training_program
    from planc.backends.train.options import TrainTarget
    from planc.compiler.ir import InputSpec, ModelSource
    from planc.dsl.source import Span

    span = Span("bench.plan", 1, 1, 1, 1)
    model = ModelSource(
        span=span, name="gpt", kind="factory", ref="examples/models/gpt.py:gpt",
        args={"n_layer": args.layers, "d_model": args.d_model, "max_seq": args.seq}, task="causal_lm",
        inputs=(InputSpec(span=span, name="input_ids", dtype="int64", dims=("batch", "seq")),), base_dir=REPO,
    )
    corpus = workdir / "corpus.txt"
    corpus.write_bytes(os.urandom(args.batch * args.nproc * (args.seq + 1) * (args.steps + 4)))
    target = TrainTarget(
        strategy=["ddp"], world_size=args.nproc, micro_batch=args.batch, steps=args.steps,
        log_every=args.steps, eval_sequences=args.nproc, grad_clip=1.0,
        data={"path": str(corpus), "seq_len": args.seq, "heldout": 0.01, "max_bytes": 10**8},
        checkpoint={"every": 10**6}, schedule={"warmup": 0, "decay": "constant"},
    )
    return emit_training_program(target, model, [], None, workdir / "generated", "")


def run_generated(args: argparse.Namespace, program: Path) -> float:
    """Run the emitted program once (no checkpoint is written: nothing resumes), read its
    steady-state tokens/s, averaged over steps 2..N (the timer restarts at each log)."""
    metrics = program / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    torchrun(args, ["train.py"], program)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in records if "tokens_per_s" in r and r["step"] == args.steps][-1]["tokens_per_s"]


def run_hand_written(args: argparse.Namespace) -> float:
    worker = [str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--layers", str(args.layers),
              "--d-model", str(args.d_model), "--seq", str(args.seq), "--batch", str(args.batch)]
    return json.loads(torchrun(args, worker, REPO).strip().splitlines()[-1])["tokens_per_s"]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180, help="rounds start while this budget lasts (one at least)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per process per step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    results_file.add_output_args(parser, "ddp")
    args = parser.parse_args(argv)
    if args.worker:
        hand_written_worker(args)
        return None
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step warms up and is not timed")

    source = results_file.provenance(__file__, argv)
    samples: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    with tempfile.TemporaryDirectory() as tmp:
        program = emit_generated(args, Path(tmp))
        runs = {PROGRAMS[0]: lambda: run_hand_written(args), PROGRAMS[1]: lambda: run_generated(args, program)}
        order, shuffler, started = list(PROGRAMS), random.Random(0), time.perf_counter()
        while not samples[PROGRAMS[0]] or time.perf_counter() - started < args.seconds:
            shuffler.shuffle(order)
            for name in order:
                samples[name].append(runs[name]())
        elapsed = time.perf_counter() - started

    rounds = len(samples[PROGRAMS[0]])
    hand = statistics.median(samples[PROGRAMS[0]])
    rows = [{"program": name, "tokens_per_s": round(statistics.median(samples[name]), 1),
             "vs_hand_written": round(statistics.median(samples[name]) / hand, 3),
             "rounds_tokens_per_s": [round(v, 1) for v in samples[name]]} for name in PROGRAMS]
    met = rows[1]["vs_hand_written"] >= 0.95
    results = {"nproc": args.nproc, "layers": args.layers, "d_model": args.d_model, "seq": args.seq, "batch": args.batch,
               "steps": args.steps, "rounds": rounds, "seconds": round(elapsed, 1), "target_met": met, "rows": rows}
    body = results_file.table(["program", "tokens/s", "x hand-written", "tokens/s of each round"],
                              [[r["program"], f"{r['tokens_per_s']:,.0f}", f"{r['vs_hand_written']:.2f}",
                                " ".join(f"{v:,.0f}" for v in r["rounds_tokens_per_s"])] for r in rows])
    body += f"\n\ntarget generated >= 0.95x hand-written: {'met' if met else 'NOT met'}"
    protocol = (f"{args.nproc} processes, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} each; both programs "
                f"once per round in a freshly shuffled order, {rounds} rounds (as many as started within "
                f"{args.seconds:g} s; took {elapsed:.0f} s), median of the rounds' steady-state tokens/s (the first step left out)")
    title = (f"DDP throughput, planc's generated program vs a hand-written loop: gpt(n_layer={args.layers}, "
             f"d_model={args.d_model}), {args.nproc} processes x batch {args.batch} x seq {args.seq}, {args.steps} steps")
    print(body)
    results_file.write(args, title, source, protocol, body, results)
    return results


if __name__ == "__main__":
    main()
