"""What every prune method shares: the oneshot-only check and the selected Linear weights."""

from __future__ import annotations

from torch import fx

from passes.base import GraphPass, PassContext, PassError
from passes.graph_utils import linear_sites, mark, select_linears
from passes.options import Prune


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


def mark_users(gm: fx.GraphModule, weights: list[str], source: str) -> None:
    """Record the plan line on every Linear that reads one of `weights`."""
    wanted = set(weights)
    for site in linear_sites(gm):
        if site.weight in wanted:
            mark(site.node, source)
