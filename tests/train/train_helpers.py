"""Shared helpers of the training-backend tests: plans in code, free ports, running programs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from planc.backends.train.options import TrainTarget
from planc.compiler.ir import InputSpec, ModelSource
from planc.dsl.source import Span

REPO = Path(__file__).resolve().parents[2]
GPT_FILE = REPO / "examples" / "models" / "gpt.py"
SPAN = Span("test.plan", 1, 1, 1, 1)

#: A tiny GPT that trains in milliseconds per step on one CPU core.
TINY_GPT = {"n_layer": 2, "n_head": 4, "d_model": 64, "max_seq": 64}


def gpt_source(**args: Any) -> ModelSource:
    """`model gpt = factory("examples/models/gpt.py:gpt", ...)` as the parser would produce it."""
    return ModelSource(
        span=SPAN,
        name="gpt",
        kind="factory",
        ref="examples/models/gpt.py:gpt",
        args={**TINY_GPT, **args},
        task="causal_lm",
        inputs=(InputSpec(span=SPAN, name="input_ids", dtype="int64", dims=("batch", "seq")),),
        base_dir=REPO,
    )


def small_corpus(tmp: Path, size: int = 60_000) -> Path:
    """A byte corpus: the first `size` bytes of the standard library's sources (stable, local)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = b""
    for path in sorted(root.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= size:
            break
    out = tmp / "corpus.txt"
    out.write_bytes(text[:size])
    return out


def target(corpus: Path, **options: Any) -> TrainTarget:
    """A short training target on `corpus`; options override the defaults below."""
    base: dict[str, Any] = {
        "world_size": 2,
        "micro_batch": 4,
        "steps": 6,
        "log_every": 1,
        "seed": 0,
        "data": {"path": str(corpus), "seq_len": 32, "heldout": 0.05},
        "schedule": {"warmup": 0, "decay": "constant"},
        "optimizer": {"lr": 3e-3},
        "eval_sequences": 32,
    }
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return TrainTarget(**base)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_program(out: Path, nproc: int, env: dict[str, str] | None = None, timeout: int = 240,
                max_restarts: int = 0) -> str:
    """launch.sh with `nproc` processes on a free local port; returns the log, raises with it on failure.

    The job runs in its own session, so a hang kills torchrun and all its workers.
    """
    full_env = {
        **os.environ,
        "NPROC_PER_NODE": str(nproc),
        "NNODES": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "MAX_RESTARTS": str(max_restarts),
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    job = subprocess.Popen(["bash", str(out / "launch.sh")], env=full_env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        raise AssertionError(f"training timed out after {timeout} s:\n{output[-6000:]}") from None
    if job.returncode != 0:
        raise AssertionError(f"training failed ({job.returncode}):\n{output[-8000:]}")
    return output


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    """Training loss per step; a resumed run's repeated steps keep their last value."""
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r and "event" not in r}


def final_eval(out: Path) -> dict[str, Any]:
    return [r for r in metrics(out) if r.get("event") == "eval"][-1]
