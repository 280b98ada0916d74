"""Shared machinery of `method = heads` and `method = channels`: find the coupled groups from
the graph's data flow (`passes/structure.py`), rank their units, and physically remove the
weakest ones.

In each selected group the `min(round(sparsity * units), units - 1)` units of lowest importance
(the l1/l2 norm of all their weights: rows of the projections whose outputs are units, columns
of the projections that read them) are removed. Weights, biases and fused-weight slices shrink;
shape constants that count units (view/reshape/expand sizes, split sizes) get the new count.
A group is pruned when a target is its root module, one of its projections, or an ancestor of
one of them. `importance = activation` is measured by the training program, which saves the
units it removed as zeros: on those weights the l2 norm finds them again.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import torch
from torch import fx

from planc.passes.base import PassContext, PassError, PassResult
from planc.passes.graph_utils import get_tensor, is_within, linear_sites, mark, placeholder_values, set_tensor
from planc.passes.prune.common import PruneMethodPass
from planc.passes.structure import CoupledGroup, Member, Refusal, StructureError, find_structure


def unit_weights(gm: torch.nn.Module, member: Member) -> torch.Tensor:
    """The member's weight per unit: [units, features per unit, other axis]."""
    weight = get_tensor(gm, member.projection.weight).detach()
    return weight.movedim(member.weight_axis, 0)[member.index.to(weight.device)]


def shrink(gm: fx.GraphModule, group: CoupledGroup, keep: torch.Tensor) -> None:
    """Keep only units `keep` (ascending): slice every member's weight (and the bias of the
    projections whose outputs are units) and set the shape constants to the kept count."""
    for member in group.members:
        projection = member.projection
        weight = get_tensor(gm, projection.weight).detach()
        features = member.index[keep].flatten().sort().values.to(weight.device)
        set_tensor(gm, projection.weight, weight.index_select(member.weight_axis, features).clone())
        if member.side == "out" and projection.bias:
            set_tensor(gm, projection.bias, get_tensor(gm, projection.bias).detach().index_select(0, features).clone())
    for constant in group.shape_constants:
        args = list(constant.node.args)
        value = constant.per_unit * len(keep)
        if constant.item is None:
            args[constant.arg] = value
        else:
            args[constant.arg] = [value if i == constant.item else v for i, v in enumerate(args[constant.arg])]
        constant.node.args = tuple(args)


def _selected(root: str, paths: tuple[str, ...], targets: frozenset[str]) -> bool:
    return any(t == root or any(is_within(p, t) for p in paths) for t in targets)


def _importance(gm: fx.GraphModule, group: CoupledGroup, norm: str) -> torch.Tensor:
    """Per-unit l1 or l2 norm over every weight of the unit, in every member."""
    slices = [unit_weights(gm, member).flatten(1).float() for member in group.members]
    if norm == "l1":
        return sum(s.abs().sum(1) for s in slices)
    return torch.sqrt(sum(s.pow(2).sum(1) for s in slices))


def _group_params(gm: fx.GraphModule, group: CoupledGroup) -> int:
    names = {m.projection.weight for m in group.members}
    names |= {m.projection.bias for m in group.members if m.side == "out" and m.projection.bias}
    return sum(get_tensor(gm, name).numel() for name in names)


class StructuredPass(PruneMethodPass):
    """Removes whole units of the selected groups of one kind (set by the subclass)."""

    kind: ClassVar[str]
    unit: ClassVar[str]
    what: ClassVar[str]

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        super().requires(gm, ctx)
        self._groups(gm, ctx)

    def _groups(self, gm: fx.GraphModule, ctx: PassContext) -> list[CoupledGroup]:
        """The selected groups, or a PassError naming why there are none or one is refused."""
        method = self.options.method
        try:
            structure = find_structure(gm, placeholder_values(gm, ctx.example_inputs))
        except StructureError as error:
            raise PassError(f"prune (method = {method}): {error}") from error
        # A module path with several projections was factored (lowrank): leave it alone.
        paths = Counter(site.module_path for site in {s.weight: s for s in linear_sites(gm)}.values())
        factored = {path for path, count in paths.items() if count > 1}
        groups = [
            g for g in structure.groups
            if g.kind == self.kind and len(g.module_paths) > 1 and _selected(g.root, g.module_paths, ctx.targets)
        ]
        refused: list[Refusal] = [
            r for r in structure.refusals
            if r.kind == self.kind and len(r.module_paths) > 1 and _selected(r.root, r.module_paths, ctx.targets)
        ]
        for group in groups:
            for path in group.module_paths:
                if path in factored:
                    raise PassError(f"{path} is already factored; run structured pruning before lowrank")
        if refused and (self.kind == "attention" or not groups):
            first = refused[0]
            raise PassError(f"prune (method = {method}) cannot shrink {first.root or 'the model'}: {first.reason}")
        if not groups:
            raise PassError(
                f"prune (method = {method}) found no {self.what} with float Linear layers in the selection"
                f" {sorted(ctx.targets)[:5]} (structured pruning must run before quantize)"
            )
        return groups

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        per_group = {}
        for group in self._groups(gm, ctx):
            before = _group_params(gm, group)
            n_drop = min(round(self.options.sparsity * group.units), group.units - 1)
            importance = _importance(gm, group, self.options.importance)
            keep = torch.sort(torch.topk(importance, group.units - n_drop).indices).values
            if n_drop:
                shrink(gm, group, keep)
                for node in [m.projection.node for m in group.members] + [c.node for c in group.shape_constants]:
                    mark(node, ctx.source)
            info = {"removed": n_drop, "total": group.units, "sparsity": n_drop / group.units, "kept": keep.tolist()}
            if self.kind == "attention":
                info.update(head_dim=group.head_dim, heads=group.heads, heads_per_unit=group.heads // group.units)
            per_group[group.root] = {**info, "params_before": before, "params_after": _group_params(gm, group)}
        gm.recompile()
        params_before = sum(g["params_before"] for g in per_group.values())
        params_after = sum(g["params_after"] for g in per_group.values())
        removed = sum(g["removed"] for g in per_group.values())
        total = sum(g["total"] for g in per_group.values())
        summary = (
            f"removed {removed}/{total} {self.unit} in {len(per_group)} blocks; "
            f"their params {params_before} -> {params_after} ({1 - params_after / max(params_before, 1):.1%} fewer)"
        )
        details = {"method": self.options.method, "groups": per_group, "params_before": params_before, "params_after": params_after}
        return PassResult(summary, details)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        with torch.no_grad():
            gm(**ctx.example_inputs)  # the shrunk graph must still run
