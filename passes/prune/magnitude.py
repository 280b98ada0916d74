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


def _prune_local(tensor: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`tensor` with its `round(sparsity * numel)` smallest |w| set to 0."""
    mask = _keep_mask(tensor.abs().flatten().float(), round(sparsity * tensor.numel()))
    return tensor * mask.reshape(tensor.shape).to(tensor.dtype)


class MagnitudePass(PruneMethodPass):
    """See the module docstring."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        super().requires(gm, ctx)
        if not unique_weights(gm, ctx):
            raise PassError(f"prune (magnitude) found no Linear layer in the selection {sorted(ctx.targets)[:5]}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sparsity, scope = self.options.sparsity, self.options.scope
        weights = unique_weights(gm, ctx)
        if scope == "global":  # one ranking over every weight: all of them in memory at once
            tensors = [get_tensor(gm, name).detach() for name in weights]
            flat = torch.cat([t.abs().flatten().float() for t in tensors])
            masks = torch.split(_keep_mask(flat, round(sparsity * flat.numel())), [t.numel() for t in tensors])
            pruned = ((name, tensor * mask.reshape(tensor.shape).to(tensor.dtype))
                      for name, tensor, mask in zip(weights, tensors, masks, strict=True))
        else:  # a weight at a time (a streamed compile reads and spills each in turn)
            pruned = ((name, _prune_local(get_tensor(gm, name).detach(), sparsity)) for name in weights)
        per_layer, zeros, total = {}, 0, 0
        for name, tensor in pruned:
            set_tensor(gm, name, tensor)
            per_layer[name.rsplit(".", 1)[0]] = round(float((tensor == 0).float().mean()), 6)
            zeros, total = zeros + int((tensor == 0).sum()), total + tensor.numel()
        mark_users(gm, weights, ctx.source)
        summary = f"pruned {len(weights)} Linear to {zeros / total:.1%} sparsity ({scope} magnitude)"
        return PassResult(summary, {"method": "magnitude", "scope": scope, "sparsity": per_layer, "zeros": zeros, "total": total})

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        opts = self.options
        zeros = total = needed = 0
        for name in unique_weights(gm, ctx):  # one weight in memory at a time
            w = get_tensor(gm, name)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
            needed += round(opts.sparsity * w.numel()) if opts.scope == "local" else 0
        needed = needed if opts.scope == "local" else round(opts.sparsity * total)
        if zeros < needed:
            raise PassError(f"magnitude pruning reached {zeros}/{total} zeros, expected at least {needed}")
