"""Unstructured (magnitude) and N:M pruning: masks on Linear weights, kept zero through training,
optionally ramped up gradually, and valid on sharded (FSDP / tensor-parallel) weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..distributed import _full, _local
from ..model import _module


class PruneMasks:
    """Unstructured (magnitude) or N:M masks on Linear weights, kept zero through training.

    Masks come from the weights' magnitudes; `apply()` after every optimizer step zeroes the
    pruned weights again. With schedule=gradual, `update(step)` recomputes the masks as
    sparsity ramps from 0 to the target (cubic ramp, Zhu & Gupta 2017) over `ramp_steps`.
    Compute the first masks on the whole model, then `bind()` to the parallelized one: FSDP and
    tensor parallelism replace parameters by sharded DTensors, which get their shard of the mask.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], method: str, sparsity: float = 0.5,
                 n: int = 2, m: int = 4, scope: str = "local", gradual: bool = False, ramp_steps: int = 0):
        self.paths = list(paths)
        self.weights = linear_weights(model, self.paths)
        self.method, self.target = method, sparsity
        self.n, self.m, self.scope, self.gradual = n, m, scope, gradual
        self.ramp_steps = max(1, ramp_steps)
        self.full_masks: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.fraction = -1.0

    def bind(self, model: nn.Module) -> None:
        """Act on `model`'s parameters from now on (only those it holds, for a pipeline stage)."""
        present = {name for name, _ in model.named_modules()}
        self.weights = linear_weights(model, [p for p in self.paths if p in present])
        self.masks = {name: self._like(self.full_masks[name], w) for name, w in self.weights.items()
                      if name in self.full_masks}
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs: how far the ramp was. The masks themselves are the zeros of
        the checkpointed weights, which `load_state_dict` reads back from the restored weights."""
        return {"fraction": self.fraction}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fraction = state["fraction"]
        self.masks = {name: (w.detach() != 0).to(w.dtype) for name, w in self.weights.items()}

    def fraction_at(self, step: int) -> float:
        if not self.gradual:
            return 1.0
        progress = min(1.0, step / self.ramp_steps)
        return 1.0 - (1.0 - progress) ** 3

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Recompute masks when the ramp moved by at least a tenth (or reached its end)."""
        fraction = self.fraction_at(step)
        if fraction == self.fraction or (fraction < 1.0 and fraction - self.fraction < 0.1):
            return
        self._compute(fraction)

    @torch.no_grad()
    def _compute(self, fraction: float) -> None:
        self.fraction = fraction
        full = {name: _full(w.detach()).float() for name, w in self.weights.items()}
        masks = self._nm_masks(full, fraction) if self.method == "nm" else self._magnitude_masks(full, fraction)
        self.full_masks.update({name: mask.cpu() for name, mask in masks.items()})
        self.masks = {name: self._like(mask, self.weights[name]) for name, mask in masks.items()}
        self.apply()

    def _magnitude_masks(self, full: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        sparsity = self.target * fraction
        if self.scope == "global":
            everything = torch.cat([w.abs().flatten() for w in full.values()])
            k = int(sparsity * everything.numel())
            threshold = everything.kthvalue(k).values if k > 0 else everything.new_tensor(-1.0)
            return {name: w.abs() > threshold for name, w in full.items()}
        masks = {}
        for name, w in full.items():
            k = int(sparsity * w.numel())
            threshold = w.abs().flatten().kthvalue(k).values if k > 0 else w.new_tensor(-1.0)
            masks[name] = w.abs() > threshold
        return masks

    def _nm_masks(self, full: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        zeros = int(round((self.m - self.n) * fraction))
        masks = {}
        for name, w in full.items():
            if w.shape[1] % self.m:
                raise ValueError(f"N:M pruning of {name}: in_features {w.shape[1]} is not a multiple of m={self.m}")
            groups = w.abs().reshape(-1, self.m)
            mask = torch.ones_like(groups, dtype=torch.bool)
            if zeros:
                mask.scatter_(1, groups.topk(zeros, dim=1, largest=False).indices, False)
            masks[name] = mask.reshape(w.shape)
        return masks

    @staticmethod
    def _like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The full mask in the weight's layout: a same-sharded DTensor for sharded weights."""
        mask = mask.to(device=_local(weight).device, dtype=weight.dtype)
        if hasattr(weight, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None)
        return mask

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    def sparsity(self) -> float:
        """Fraction of zero weights among the masked ones (local shards)."""
        zeros = sum(int((_local(w) == 0).sum()) for w in self.weights.values())
        total = sum(_local(w).numel() for w in self.weights.values())
        return zeros / max(1, total)


def linear_weights(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Parameter]:
    """`path.weight` -> Parameter for each selected Linear (the parameters masks act on)."""
    weights = {}
    for path in paths:
        module = _module(model, path)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"magnitude/nm pruning applies to Linear layers; {path} is a {type(module).__name__}")
        weights[f"{path}.weight"] = module.weight
    return weights
