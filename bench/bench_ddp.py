"""Throughput of planc's generated DDP program against a minimal hand-written DDP loop.

Both train the example GPT with the same batch, AdamW and gradient clipping, on 2 processes
(gloo on CPU, nccl on GPU), under torchrun; the table compares steady-state tokens/s
(the first step, which warms up, is left out of both). Target: generated >= 0.95x hand-written.

    python bench/bench_ddp.py [--steps 30] [--nproc 2] [--layers 4] [--d-model 128] [--seq 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def run_generated(args: argparse.Namespace, workdir: Path) -> float:
    """Emit the DDP program for the same model and batch, run it, read its steady-state tokens/s."""
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
    out = emit_training_program(target, model, [], None, workdir / "generated", "")
    torchrun(args, ["train.py"], out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "tokens_per_s" in r and r["step"] == args.steps]
    return steady[-1]["tokens_per_s"]  # averaged over steps 2..N (the timer restarts at each log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per process per step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        hand_written_worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        generated = run_generated(args, Path(tmp))
        worker = [str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--layers", str(args.layers),
                  "--d-model", str(args.d_model), "--seq", str(args.seq), "--batch", str(args.batch)]
        output = torchrun(args, worker, REPO)
        hand = json.loads(output.strip().splitlines()[-1])["tokens_per_s"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DDP throughput: gpt(n_layer={args.layers}, d_model={args.d_model}), "
                        f"{args.nproc} processes x batch {args.batch} x seq {args.seq}, {args.steps} steps")
    table.add_column("program")
    table.add_column("tokens/s", justify="right")
    table.add_column("vs hand-written", justify="right")
    table.add_row("hand-written DDP loop", f"{hand:,.0f}", "1.00x")
    table.add_row("planc generated train.py", f"{generated:,.0f}", f"{generated / hand:.2f}x")
    Console().print(table)
    print(f"target >= 0.95x: {'met' if generated >= 0.95 * hand else 'NOT met'}")


if __name__ == "__main__":
    main()
