"""Checkpoints: periodic, atomic, resumable (replicated or sharded), and the final weights.

save_atomically    torch.save through a temporary file and a rename
Checkpointer       step_XXXXXXXX/ folders: save, and restore the newest complete one
rng_state          the random generators' state, saved with a checkpoint
full_state_dict    the whole model's weights on rank 0, gathered across shards and stages
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import Parallel


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Periodic checkpoints in `root/step_00000050/`, written to `step_....tmp/` then renamed.

    A directory without `.tmp` is complete by construction, so resuming picks the newest such
    directory. `sharded=False`: rank 0 torch.saves the (replicated) model and optimizer;
    `sharded=True`: every rank writes its shards with torch.distributed.checkpoint (FSDP,
    tensor and pipeline parallel). Progress (step, scheduler, scaler, RNG) goes to `extra.pt`.
    """

    def __init__(self, root: Path, keep: int, sharded: bool, par: Parallel):
        self.root, self.keep, self.sharded, self.par = root, keep, sharded, par

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(model, optimizer, options=_dcp_options())
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        elif self.par.is_main:
            torch.save({"model": _unwrap(model).state_dict(), "optim": optimizer.state_dict()}, tmp / "state.pt")
        if self.par.is_main:
            torch.save(extra, tmp / "extra.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint into model and optimizer; its `extra`, or None."""
        found = self.complete()
        if not found:
            return None
        latest = found[-1]
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(model, optimizer, options=_dcp_options())
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=str(latest))
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=_dcp_options())
        else:
            state = torch.load(latest / "state.pt", map_location=self.par.device, weights_only=False)
            _unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
        return torch.load(latest / "extra.pt", map_location="cpu", weights_only=False)


def _dcp_options() -> Any:
    """Optimizer state keyed by parameter name, not group index: pipeline stages hold different
    parameters in same-numbered groups, which would collide in one checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(model: nn.Module, par: Parallel, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on rank 0 (empty elsewhere); a collective when sharded.

    Pipeline stages each hold part of the model: rank 0 gathers the parts of its pipeline.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Unsharded on every rank of the group (cpu_offload would keep only global rank 0's,
        # losing the other pipeline stages).
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        state = {k: v.detach().cpu() for k, v in state.items()}
    else:
        state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    if par.pp_size > 1:
        parts: list[Any] = [None] * par.pp_size
        group = par.mesh["pp"].get_group()
        holder = state if (par.dp_rank == 0 and par.tp_rank == 0) else {}
        dist.all_gather_object(parts, holder, group=group)
        state = {k: v for part in parts for k, v in part.items()}
    return state if par.is_main else {}
