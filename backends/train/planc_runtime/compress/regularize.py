"""Sparsity from regularization: group lasso on attention heads / MLP channels, L1 on weights.

The plan's `regularize { group, l1, threshold }` adds a penalty to the training objective:

    heads, channels   l1 * sum_g sqrt(p_g) * ||W_g||_2   (group lasso, Yuan & Lin 2006)
    weights           l1 * sum |w|                      (lasso)

A group g is one unit of the coupled structure the traced graph shows (structure.py, as for
structured pruning): a head's q/k/v rows and biases with its out-projection columns, or a
channel's up (and gate) rows and biases with its down-projection column; p_g counts its
entries. The penalty is minimized by its proximal step after each optimizer step, block soft
thresholding `W_g *= max(0, 1 - lr * l1 * sqrt(p_g) / ||W_g||)` (Parikh & Boyd 2014, 6.5.4),
rather than by its subgradient in backward: the subgradient only makes a group jitter around
zero at the scale of the learning rate, the proximal step sets it exactly to zero. A zero head
or channel then gets no gradient at all (nothing flows through it), so it stays zero.

After training, `finish` sets what ended at or below `threshold` exactly to zero and reports the
count; the plan's prune steps on the same groups then run on the trained weights (`prune`): the
units they remove are the weakest by l2 (or l1), so the zero ones go first, and the report says
whether any unit they removed had not reached zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..structure import CoupledGroup
from .masks import PruneMasks
from .units import _parameter, _selected, model_inputs, selected_groups


def regularizer(model: nn.Module, paths: Sequence[str] | None, group: str, l1: float, threshold: float,
                example: dict[str, torch.Tensor] | None = None) -> GroupLasso | WeightL1:
    """The plan's regularizer on `model`: over the groups (heads/channels) or Linear weights the
    modules `paths` select, or the whole model's when `paths` is None. `example`: a batch of the
    model's inputs to trace it on, to find its heads and channels."""
    if group == "weights":
        return WeightL1(model, paths, l1, threshold)
    return GroupLasso(model, paths, group, l1, threshold, example)


class _Slice:
    """Where one coupled group's units sit in one tensor: `index[u]` = unit u's entries along
    `axis`; `weight` tells a weight from a bias (importance ranks weights only, as the compile
    does)."""

    def __init__(self, tensor: torch.Tensor, axis: int, index: torch.Tensor, weight: bool) -> None:
        self.tensor, self.axis, self.weight = tensor, axis, weight
        self.index = index.to(tensor.device)
        self.per_entry = tensor.numel() // tensor.shape[axis]  # entries behind one index along `axis`

    def squares(self) -> torch.Tensor:
        """Per unit: the sum of its squared entries in this tensor."""
        units = self.tensor.detach().movedim(self.axis, 0)[self.index]
        return units.flatten(1).float().pow(2).sum(1)

    def absolutes(self) -> torch.Tensor:
        units = self.tensor.detach().movedim(self.axis, 0)[self.index]
        return units.flatten(1).float().abs().sum(1)

    def entries(self) -> int:
        return self.index.shape[1] * self.per_entry


def _slices(model: nn.Module, group: CoupledGroup) -> list[_Slice]:
    slices = []
    for member in group.members:
        weight = _parameter(model, member.projection.weight)[2]
        slices.append(_Slice(weight, member.weight_axis, member.index, weight=True))
        if member.side == "out" and member.projection.bias:
            slices.append(_Slice(_parameter(model, member.projection.bias)[2], 0, member.index, weight=False))
    return slices


class GroupLasso:
    """Group lasso over the selected heads or channels (see the module docstring)."""

    def __init__(self, model: nn.Module, paths: Sequence[str] | None, group: str, l1: float, threshold: float,
                 example: dict[str, torch.Tensor] | None = None) -> None:
        kind = "attention" if group == "heads" else "mlp"
        inputs = model_inputs(model, example)
        self.groups = selected_groups(model, kind, list(paths) if paths is not None else [""], inputs,
                                      f"regularize group={group}")
        if not self.groups:
            where = f" among {list(paths)[:4]}" if paths is not None else ""
            raise ValueError(f"regularize group={group} found no {'attention' if kind == 'attention' else 'MLP'} "
                             f"with Linear layers{where}")
        self.group, self.l1, self.threshold = group, l1, threshold
        self.slices = [_slices(model, g) for g in self.groups]
        self.sizes = torch.tensor([sum(s.entries() for s in slices) for slices in self.slices for _ in
                                   range(len(slices[0].index))], dtype=torch.float32)

    def norms(self) -> torch.Tensor:
        """||W_g||_2 of every unit, group after group, in the order of `self.groups` (on the CPU)."""
        return torch.cat([sum(s.squares() for s in slices).sqrt().cpu() for slices in self.slices])

    def value(self) -> float:
        """The penalty: l1 * sum_g sqrt(p_g) * ||W_g||_2."""
        return self.l1 * float((self.sizes.sqrt() * self.norms()).sum())

    def zeros(self) -> int:
        """Units whose norm is at or below the threshold."""
        return int((self.norms() <= self.threshold).sum())

    @torch.no_grad()
    def prox(self, lr: float) -> None:
        """The proximal step of lr * penalty: shrink every unit's norm by lr * l1 * sqrt(p_g),
        to exactly zero where it was smaller."""
        factors = []
        for slices in self.slices:
            norm = sum(s.squares() for s in slices).sqrt()
            step = lr * self.l1 * math.sqrt(sum(s.entries() for s in slices))
            factor = (1 - step / norm.clamp(min=1e-30)).clamp(min=0)
            factors.append(factor if all(s.tensor.requires_grad for s in slices) else torch.ones_like(factor))
        self._scale(factors)  # a group with frozen weights (`freeze`) is left alone

    @torch.no_grad()
    def _scale(self, factors: list[torch.Tensor]) -> None:
        """Multiply each group's units by their factor; each tensor is scaled once, even when
        several members (a fused q/k/v projection) own entries of it."""
        scales: dict[tuple[int, int], tuple[torch.Tensor, int, torch.Tensor]] = {}
        for slices, factor in zip(self.slices, factors):
            for s in slices:
                key = (id(s.tensor), s.axis)
                if key not in scales:
                    scales[key] = (s.tensor, s.axis, torch.ones(s.tensor.shape[s.axis], device=s.tensor.device))
                scales[key][2][s.index] = factor.to(s.tensor.device)[:, None].expand_as(s.index).to(scales[key][2].dtype)
        for tensor, axis, scale in scales.values():
            shape = [1] * tensor.dim()
            shape[axis] = -1
            tensor.mul_(scale.view(shape).to(tensor.dtype))

    @torch.no_grad()
    def finish(self) -> dict[str, Any]:
        """Set the units at or below the threshold exactly to zero; what reached zero, per block."""
        factors = [(sum(s.squares() for s in slices).sqrt() > self.threshold).float() for slices in self.slices]
        self._scale(factors)
        per_block = {g.root: [int((f == 0).sum()), len(f)] for g, f in zip(self.groups, factors)}
        return {"group": self.group, "l1": self.l1, "threshold": self.threshold, "groups": int(self.sizes.numel()),
                "zero_groups": sum(z for z, _ in per_block.values()), "per_block": per_block,
                "regularizer": self.value()}

    @torch.no_grad()
    def prune(self, paths: Sequence[str], sparsity: float, importance: str = "l2", **_: Any) -> dict[str, Any]:
        """A prune step on the trained weights: in each selected block the
        min(round(sparsity * units), units - 1) units of lowest l1/l2 weight norm (the compile's
        rule, passes/prune/structured.py) become zero. Zero is what a removed unit contributes,
        so the model computes what the pruned one will; the compile after training finds them
        by their zero norm and removes them."""
        removed = nonzero = zero_kept = 0
        factors = []
        for group, slices in zip(self.groups, self.slices):
            units = len(slices[0].index)
            factor = torch.ones(units)
            if _selected(group.root, group.module_paths, paths):
                weights = [s for s in slices if s.weight]
                score = (sum(s.absolutes() for s in weights) if importance == "l1"
                         else sum(s.squares() for s in weights).sqrt()).cpu()
                drop = min(round(sparsity * units), units - 1)
                gone = score.topk(drop, largest=False).indices if drop else torch.zeros(0, dtype=torch.long)
                norm = sum(s.squares() for s in slices).sqrt().cpu()
                factor[gone] = 0
                removed += drop
                nonzero += int((norm[gone] > 0).sum())
                zero_kept += int(((norm == 0) & (factor == 1)).sum())
            factors.append(factor)
        self._scale(factors)
        return {"removed": removed, "removed_nonzero": nonzero, "zero_kept": zero_kept}


class WeightL1:
    """L1 on the Linear weights of the selected modules (every Linear when paths is None)."""

    def __init__(self, model: nn.Module, paths: Sequence[str] | None, l1: float, threshold: float) -> None:
        if paths is None:
            paths = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        linears = {p: model.get_submodule(p) for p in paths}
        self.weights = {p: m.weight for p, m in linears.items() if isinstance(m, nn.Linear)}
        if not self.weights:
            raise ValueError("regularize group=weights found no Linear layer to regularize")
        self.model, self.group, self.l1, self.threshold = model, "weights", l1, threshold

    def value(self) -> float:
        return self.l1 * sum(float(w.detach().abs().sum()) for w in self.weights.values())

    def zeros(self) -> int:
        return sum(int((w.detach().abs() <= self.threshold).sum()) for w in self.weights.values())

    @torch.no_grad()
    def prox(self, lr: float) -> None:
        """Soft thresholding: every weight moves lr * l1 toward zero, and stops there."""
        for w in self.weights.values():
            if w.requires_grad:  # frozen weights (`freeze`) are left alone
                w.copy_(w.sign() * (w.abs() - lr * self.l1).clamp(min=0))

    @torch.no_grad()
    def finish(self) -> dict[str, Any]:
        per_block = {}
        for path, w in self.weights.items():
            small = w.abs() <= self.threshold
            w.masked_fill_(small, 0)
            per_block[path] = [int(small.sum()), w.numel()]
        return {"group": self.group, "l1": self.l1, "threshold": self.threshold,
                "groups": sum(n for _, n in per_block.values()), "zero_groups": sum(z for z, _ in per_block.values()),
                "per_block": per_block, "regularizer": self.value()}

    @torch.no_grad()
    def prune(self, paths: Sequence[str], **step: Any) -> dict[str, Any]:
        """A magnitude / N:M prune step on the trained weights (masks once, from their magnitudes)."""
        masks = PruneMasks(self.model, paths, **step)
        nonzero = {name: w != 0 for name, w in masks.weights.items()}
        masks.update(step=0)
        counts = {"removed": 0, "removed_nonzero": 0, "zero_kept": 0}
        for name, mask in masks.masks.items():
            gone = mask == 0
            counts["removed"] += int(gone.sum())
            counts["removed_nonzero"] += int((gone & nonzero[name]).sum())
            counts["zero_kept"] += int((~gone & ~nonzero[name]).sum())
        return counts
