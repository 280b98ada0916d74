"""N:M semi-structured pruning: in every group of `m` consecutive weights along the input
dimension of a selected Linear, all but the `n` largest |w| become 0 (needs in_features % m == 0)."""

from __future__ import annotations

import torch
from torch import fx

from planc.passes.base import PassContext, PassError, PassResult
from planc.passes.graph_utils import get_tensor, set_tensor
from planc.passes.prune.common import PruneMethodPass, mark_users, selected_weights, unique_weights


class NMPass(PruneMethodPass):
    """See the module docstring."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        super().requires(gm, ctx)
        selected_weights(gm, ctx, "nm", self.options.m)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        n, m = self.options.n, self.options.m
        weights = unique_weights(gm, ctx)
        per_layer = {}
        for name in weights:
            w = get_tensor(gm, name).detach()
            groups = w.reshape(w.shape[0], -1, m)
            keep = groups.abs().topk(n, dim=-1).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
            pruned = (groups * mask.to(w.dtype)).reshape(w.shape)
            set_tensor(gm, name, pruned)
            per_layer[name.rsplit(".", 1)[0]] = round(float((pruned == 0).float().mean()), 6)
        mark_users(gm, weights, ctx.source)
        return PassResult(f"pruned {len(weights)} Linear to {n}:{m} sparsity", {"method": "nm", "n": n, "m": m, "sparsity": per_layer})

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        n, m = self.options.n, self.options.m
        for name in unique_weights(gm, ctx):
            w = get_tensor(gm, name)
            if int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) > n:
                raise PassError(f"{name} breaks the {n}:{m} pattern after pruning")
