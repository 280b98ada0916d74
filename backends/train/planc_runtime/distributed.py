"""Distributed setup: join the torchrun job and build the (pp, dp, tp) device mesh.

Parallel            where this process sits: device, rank, mesh coordinates
init_distributed    join the job (or form a one-process one), nccl or gloo
seed_everything     the same seed (hence the same initial weights) on every rank
_local, _full       a DTensor's local shard / whole tensor (plain tensors pass through)
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Parallel:
    """Where this process sits: its device and its coordinates in the (pp, dp, tp) mesh."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh with dims ("pp", "dp", "tp")

    @property
    def pp_size(self) -> int:
        return self.mesh["pp"].size()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size()

    @property
    def tp_size(self) -> int:
        return self.mesh["tp"].size()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics and saves the trained weights."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(pipeline_stages: int = 1, tensor_parallel: int = 1) -> Parallel:
    """Join the torchrun job (or form a one-process job when run as plain `python train.py`).

    nccl when CUDA is visible, gloo otherwise. The data-parallel size is what remains of the
    world after the pipeline and tensor-parallel dimensions, so the same program runs from one
    process to many nodes.
    """
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        # torchrun keeps one store across restarts: give every attempt its own key space, so a
        # restarted worker never reads the addresses its dead predecessors published.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"planc/attempt_{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
    world = dist.get_world_size()
    if world % (pipeline_stages * tensor_parallel):
        raise RuntimeError(
            f"{world} processes cannot hold {pipeline_stages} pipeline stages x "
            f"{tensor_parallel} tensor-parallel ranks: the world size must be a multiple of "
            f"{pipeline_stages * tensor_parallel}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // (pipeline_stages * tensor_parallel)
    mesh = init_device_mesh(
        device.type, (pipeline_stages, dp, tensor_parallel), mesh_dim_names=("pp", "dp", "tp")
    )
    return Parallel(dist.get_rank(), world, local_rank, device, backend, mesh)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: every rank builds identical initial weights."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered if it is sharded (a collective for DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
