"""Logging and faults: log setup, metrics, progress, step timing, cross-rank means of losses,
and the fault injection the restart tests use."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .distributed import Parallel

log = logging.getLogger("planc.train")


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere; silence known-harmless library warnings."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # FSDP warns about the key/value views our blocks return next to the hidden state.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.*")


class MetricsLog:
    """JSON lines on rank 0: one record per logged step, plus events (start, resume, eval, done)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ProgressBar:
    """A tqdm bar on rank 0 (a no-op elsewhere, or if tqdm is missing)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                pass

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepTimer:
    """Wall time of one optimizer step (synchronizing CUDA so the time is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def restart(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def maybe_fail(step: int, rank: int) -> None:
    """Fault injection for tests: with PLANC_FAIL_AT_STEP=k (and PLANC_FAIL_RANK, default 1), that
    rank exits at step k on the job's first attempt, so torchrun restarts it from a checkpoint."""
    at = os.environ.get("PLANC_FAIL_AT_STEP")
    if at is None or step != int(at) or rank != int(os.environ.get("PLANC_FAIL_RANK", "1")):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        log.error("PLANC_FAIL_AT_STEP=%s: rank %d exits on purpose", at, rank)
        os._exit(17)


def global_mean(total: torch.Tensor, count: int, par: Parallel) -> float:
    """sum(total) / sum(count) over the ranks holding a loss (see `loss_weight`): a mean over
    every evaluated sequence, whatever the parallel layout."""
    holds = 1.0 if loss_weight(par) > 0 else 0.0
    both = torch.tensor([float(total) * holds, count * holds], dtype=torch.float64, device=par.device)
    if dist.get_world_size() > 1:
        dist.all_reduce(both)
    return float(both[0] / both[1].clamp(min=1))


def mean_over(value: torch.Tensor, weight: float, device: torch.device) -> float:
    """All-reduce `value * weight` over the world: the weight is 1/dp on the ranks that hold the
    value (last pipeline stage, first tensor-parallel rank) and 0 elsewhere, giving the mean."""
    total = torch.as_tensor(value, dtype=torch.float64, device=device).detach() * weight
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total)


def loss_weight(par: Parallel) -> float:
    """This rank's weight in `mean_over`: the loss lives on the last pipeline stage, once per
    tensor-parallel group, and is averaged over the data-parallel ranks."""
    holds_loss = par.pp_rank == par.pp_size - 1 and par.tp_rank == 0
    return 1.0 / par.dp_size if holds_loss else 0.0
