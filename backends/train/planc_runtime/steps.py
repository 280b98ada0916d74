"""Step mechanics: the optimizer and its schedule, mixed precision, loss scaling, gradient
clipping and activation checkpointing."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import _full, _local


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of storing them.

    Overrides the block's `forward` on the instance, so parameter names (and checkpoints) are
    unchanged and FSDP/DDP hooks still run.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        forward = block.forward

        def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   betas: Sequence[float], momentum: float) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on matrices only (not on biases, norms or 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def lr_multiplier(step: int, total: int, warmup: int, decay: str, min_ratio: float) -> float:
    """Linear warmup to the peak, then cosine/linear decay to `min_ratio` of it (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1 - min_ratio) * progress


def make_grad_scaler(device: torch.device, synced: bool, init_scale: float = 2.0**16,
                     growth_interval: int = 2000) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16: the scale halves (and the step is skipped) on overflow and
    doubles after `growth_interval` clean steps. `synced`: ranks hold different gradients (FSDP
    shards, pipeline stages, tensor-parallel shards), so an overflow anywhere skips the step everywhere."""
    if synced:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=device.type, init_scale=init_scale, growth_interval=growth_interval,
                                   process_group=dist.group.WORLD)
    else:
        scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval)
    scaler.scale(torch.zeros((), device=device))  # create the scale now: early pipeline stages never scale a loss
    return scaler


@torch.no_grad()
def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float | None, group: Any = None) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (None: only measure it); returns the norm.

    Sharded (DTensor) gradients count once across their shards, replicated ones once per rank;
    `group` (the pipeline group) adds up the norms of the stages, which hold different weights.
    Everything stays on the device: no synchronization per step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    squared = torch.zeros((), dtype=torch.float32, device=_local(grads[0]).device)
    if plain:
        squared += torch.nn.utils.get_total_norm(plain, foreach=True).float() ** 2
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for g in sharded:  # norms of DTensors combine only within one device mesh (2-D FSDP x TP has two)
        by_mesh.setdefault(g.device_mesh, []).append(g)
    for group_grads in by_mesh.values():
        squared += _full(torch.nn.utils.get_total_norm(group_grads, foreach=True)).float() ** 2
    if group is not None:
        dist.all_reduce(squared, group=group)
    total = squared.sqrt()
    if max_norm is not None:
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if plain:
            torch._foreach_mul_(plain, factor.to(plain[0].dtype))
        for g in sharded:
            g.mul_(factor.to(g.dtype))
    return total


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Mixed precision compute for bf16/fp16; parameters (master weights) stay fp32."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield
