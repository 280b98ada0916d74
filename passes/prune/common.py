"""What every prune method shares: the oneshot-only check and the selected Linear weights."""

from __future__ import annotations

from torch import fx

from planc.passes.base import GraphPass, PassContext, PassError
from planc.passes.graph_utils import linear_sites, mark, select_linears, stored_tensor
from planc.passes.prune import Prune


class PruneMethodPass(GraphPass[Prune]):
    """Base of the per-method prune passes: compile-time pruning is oneshot."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self.options.schedule == "gradual":
            raise PassError(
                "schedule = gradual ramps sparsity during training and is applied by the train target;"
                " use schedule = oneshot to prune at compile time"
            )


def unique_weights(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    """Dotted names of the selected Linears' weights, each once (a weight may be called twice)."""
    return list(dict.fromkeys(site.weight for site in select_linears(gm, ctx.targets)))


def selected_weights(gm: fx.GraphModule, ctx: PassContext, method: str, nm: int | None = None) -> list[str]:
    """The selected Linears' weights; an error if there are none, or (with `nm` = m) if an input
    width does not split into groups of m."""
    weights = unique_weights(gm, ctx)
    if not weights:
        raise PassError(f"prune ({method}) found no Linear layer in the selection {sorted(ctx.targets)[:5]}")
    bad = [name.rsplit(".", 1)[0] for name in weights if nm and stored_tensor(gm, name).shape[1] % nm]
    if bad:
        raise PassError(f"N:M pruning with m = {nm} needs in_features divisible by {nm}; not so for {bad[:3]}")
    return weights


def mark_users(gm: fx.GraphModule, weights: list[str], source: str) -> None:
    """Record the plan line on every Linear that reads one of `weights`."""
    wanted = set(weights)
    for site in linear_sites(gm):
        if site.weight in wanted:
            mark(site.node, source)
