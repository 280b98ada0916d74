"""What wanda and sparsegpt share: block-by-block pruning on measured layer inputs.

The selected Linears are visited group by group in graph order (`passes/calibration.py`), each
group's input measured on the calibration samples with the earlier groups already pruned, so a
layer is pruned for the inputs the pruned model really gives it. The method (`prune_weight`)
returns the new weight: zeros where pruned (`structure = unstructured`: `round(sparsity * in)`
per output row, or with sparsegpt's `scope = block` `round(sparsity * out * in)` per layer;
`structure = nm`: `m - n` of every `m` consecutive inputs), shapes unchanged.
A weight read by several inputs is pruned on the first one's statistics.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from planc.passes.base import PassContext, PassError, PassResult
from planc.passes.calibration import InputStats, load_calibration, output_error, sequential
from planc.passes.graph_utils import LinearSite, get_tensor, select_linears, set_tensor, stored_tensor
from planc.passes.prune.common import PruneMethodPass, mark_users, selected_weights, unique_weights


class CalibratedPrunePass(PruneMethodPass):
    """Base of the calibrated prune methods: subclasses implement `prune_weight`."""

    label: ClassVar[str]

    def prune_weight(self, w: torch.Tensor, stats: InputStats) -> torch.Tensor:
        """The pruned (and possibly updated) weight for inputs described by `stats`."""
        raise NotImplementedError

    @property
    def nm(self) -> tuple[int, int] | None:
        return (self.options.n, self.options.m) if self.options.structure == "nm" else None

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        super().requires(gm, ctx)
        selected_weights(gm, ctx, self.options.method, self.options.m if self.nm else None)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        linears = select_linears(gm, ctx.targets)
        samples = load_calibration(ctx, opts.calibration, opts.calibration_samples, f"{opts.method} pruning")
        sparsity: dict[str, float] = {}
        errors: dict[str, float] = {}
        zeros: dict[str, tuple[int, int]] = {}  # weight: (zeros, entries)

        def solve(sites: list[LinearSite], stats: InputStats) -> None:
            for site in sites:
                if site.weight in zeros:  # already pruned on an earlier input
                    continue
                w = get_tensor(gm, site.weight).detach().float()
                pruned = self.prune_weight(w, stats)
                errors[site.module_path] = output_error(w, pruned, stats.hessian)
                zeros[site.weight] = (int((pruned == 0).sum()), pruned.numel())
                sparsity[site.module_path] = round(zeros[site.weight][0] / pruned.numel(), 6)
                set_tensor(gm, site.weight, pruned.to(stored_tensor(gm, site.weight).dtype))

        seconds = sequential(gm, samples, linears, solve, opts.method)
        weights = unique_weights(gm, ctx)
        mark_users(gm, weights, ctx.source)
        for name in set(weights) - set(zeros):  # a weight no sample reached keeps its values
            w = get_tensor(gm, name)
            zeros[name] = (int((w == 0).sum()), w.numel())
        zero_count, total = (sum(counts) for counts in zip(*(zeros[name] for name in weights), strict=True))
        pattern = f"{opts.n}:{opts.m}" if self.nm else f"{opts.sparsity:.1%} per {'block' if opts.scope == 'block' else 'row'}"
        summary = f"pruned {len(weights)} Linear to {zero_count / total:.1%} sparsity ({self.label}, {pattern}) in {seconds:.1f}s"
        details = {
            "method": opts.method, "structure": opts.structure, "scope": opts.scope, "sparsity": sparsity, "output_error": errors,
            "zeros": zero_count, "total": total, "seconds": round(seconds, 3),
        }
        return PassResult(summary, details)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        opts = self.options
        for name in unique_weights(gm, ctx):
            w = get_tensor(gm, name)
            if self.nm:
                if int((w.reshape(w.shape[0], -1, opts.m) != 0).sum(-1).max()) > opts.n:
                    raise PassError(f"{name} breaks the {opts.n}:{opts.m} pattern after pruning")
            elif opts.scope == "block":
                if int((w == 0).sum()) < round(opts.sparsity * w.numel()):
                    raise PassError(f"{name} has fewer than {round(opts.sparsity * w.numel())} zeros after pruning")
            elif int((w == 0).sum(1).min()) < round(opts.sparsity * w.shape[1]):
                raise PassError(f"{name} has a row with fewer than {round(opts.sparsity * w.shape[1])} zeros after pruning")


def drop_smallest(score: torch.Tensor, drop: int) -> torch.Tensor:
    """Boolean mask, True at the `drop` lowest scores of each row (ties broken by position)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :drop], True)
