"""Unstructured magnitude pruning of the selected Linear weights (shapes unchanged).

- `scope = local`: in each weight, the `round(sparsity * numel)` entries of smallest |w| become 0.
- `scope = global`: one ranking over all selected weights together; the `round(sparsity * total)`
  smallest |w| become 0, so layers end with different sparsity.
"""

from __future__ import annotations

import torch
from torch import fx

from planc.passes.base import PassContext, PassError, PassResult
from planc.passes.graph_utils import get_tensor, set_tensor
from planc.passes.prune.common import PruneMethodPass, mark_users, unique_weights


def _keep_mask(magnitudes: torch.Tensor, drop: int) -> torch.Tensor:
    """False at the `drop` smallest entries of a flat tensor (ties broken by position)."""
    mask = torch.ones_like(magnitudes, dtype=torch.bool)
    mask[torch.argsort(magnitudes, stable=True)[:drop]] = False
    return mask


class MagnitudePass(PruneMethodPass):
    """See the module docstring."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        super().requires(gm, ctx)
        if not unique_weights(gm, ctx):
            raise PassError(f"prune (magnitude) found no Linear layer in the selection {sorted(ctx.targets)[:5]}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sparsity, scope = self.options.sparsity, self.options.scope
        weights = unique_weights(gm, ctx)
        tensors = [get_tensor(gm, name).detach() for name in weights]
        if scope == "global":
            flat = torch.cat([t.abs().flatten().float() for t in tensors])
            masks = list(torch.split(_keep_mask(flat, round(sparsity * flat.numel())), [t.numel() for t in tensors]))
        else:
            masks = [_keep_mask(t.abs().flatten().float(), round(sparsity * t.numel())) for t in tensors]
        per_layer = {}
        for name, tensor, mask in zip(weights, tensors, masks, strict=True):
            pruned = tensor * mask.reshape(tensor.shape).to(tensor.dtype)
            set_tensor(gm, name, pruned)
            per_layer[name.rsplit(".", 1)[0]] = round(float((pruned == 0).float().mean()), 6)
        mark_users(gm, weights, ctx.source)
        total = sum(t.numel() for t in tensors)
        zeros = sum(int((get_tensor(gm, n) == 0).sum()) for n in weights)
        summary = f"pruned {len(weights)} Linear to {zeros / total:.1%} sparsity ({scope} magnitude)"
        return PassResult(summary, {"method": "magnitude", "scope": scope, "sparsity": per_layer, "zeros": zeros, "total": total})

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        opts = self.options
        weights = [get_tensor(gm, name) for name in unique_weights(gm, ctx)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        total = sum(w.numel() for w in weights)
        needed = sum(round(opts.sparsity * w.numel()) for w in weights) if opts.scope == "local" else round(opts.sparsity * total)
        if zeros < needed:
            raise PassError(f"magnitude pruning reached {zeros}/{total} zeros, expected at least {needed}")
