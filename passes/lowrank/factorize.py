"""Factor selected Linear layers into two thinner Linears with a truncated SVD.

Rewrite rules
1. For a selected `y = linear(x, W, b)` with W [out, in] and SVD `W = U S V^T`, choose r:
   `rank` (capped at min(out, in)), or the smallest r whose singular values keep
   `energy` of `sum(s^2)`.
2. If `r * (in + out) < in * out` the node becomes `y = linear(linear(x, A), B, b)` with
   `A = sqrt(S_r) V_r^T` [r, in] and `B = U_r sqrt(S_r)` [out, r], stored at
   `<module>.lowrank_in.weight` / `<module>.lowrank_out.weight`; W is removed from the module.
3. Otherwise the layer is left alone and reported as skipped (factoring would add parameters).

Guarantees: `||W - B A||_F / ||W||_F = sqrt(sum of dropped s^2) / ||s||` (Eckart-Young), reported
per layer; parameter count of every factored layer drops.
"""

from __future__ import annotations

import torch
from torch import fx

from planc.passes.base import GraphPass, PassContext, PassError, PassResult
from planc.passes.graph_utils import (
    LINEAR,
    copy_meta,
    erase_if_unused,
    get_attr_node,
    get_tensor,
    select_linears,
    set_tensor,
)
from planc.passes.lowrank import LowRank
from planc.passes.ranks import choose_rank


class LowRankPass(GraphPass[LowRank]):
    """See the module docstring for the rewrite rules."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not select_linears(gm, ctx.targets):
            raise PassError(f"lowrank found no Linear layer in the selection {sorted(ctx.targets)[:5]}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        factored, skipped = {}, {}
        done: dict[str, tuple[str, str]] = {}  # weight -> (in_name, out_name), for shared weights
        for site in select_linears(gm, ctx.targets):
            if site.weight not in done:
                w = get_tensor(gm, site.weight).detach()
                n_out, n_in = w.shape
                u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
                r = choose_rank(s, self.options.rank, self.options.energy)
                if r * (n_in + n_out) >= n_in * n_out:
                    skipped[site.module_path] = {"rank": r, "shape": [n_out, n_in], "reason": "would not reduce parameters"}
                    continue
                root = s[:r].sqrt()
                a = (root[:, None] * vh[:r]).to(w.dtype)
                b = (u[:, :r] * root[None, :]).to(w.dtype)
                base = site.weight.rsplit(".", 1)[0]
                in_name, out_name = f"{base}.lowrank_in.weight", f"{base}.lowrank_out.weight"
                set_tensor(gm, in_name, a, buffer=False)
                set_tensor(gm, out_name, b, buffer=False)
                done[site.weight] = (in_name, out_name)
                error = float(torch.linalg.norm(w.double() - b.double() @ a.double()) / torch.linalg.norm(w.double()))
                factored[site.module_path] = {
                    "rank": r,
                    "shape": [n_out, n_in],
                    "params_before": n_in * n_out,
                    "params_after": r * (n_in + n_out),
                    "relative_error": error,
                    "svd_bound": float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()),
                }
            in_name, out_name = done[site.weight]
            self._rewrite(gm, site.node, in_name, out_name, ctx.source)
        self._factored = done
        for weight in done:
            for node in list(gm.graph.find_nodes(op="get_attr", target=weight)):
                erase_if_unused(gm, node)
        before = sum(v["params_before"] for v in factored.values())
        after = sum(v["params_after"] for v in factored.values())
        summary = f"factored {len(factored)} Linear ({before} -> {after} params), skipped {len(skipped)}"
        return PassResult(summary, {"factored": factored, "skipped": skipped})

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for weight, (in_name, out_name) in getattr(self, "_factored", {}).items():
            if gm.graph.find_nodes(op="get_attr", target=weight):
                raise PassError(f"lowrank left a use of the original weight {weight}")
            a, b = get_tensor(gm, in_name), get_tensor(gm, out_name)
            if a.shape[0] != b.shape[1] or a.numel() + b.numel() >= a.shape[1] * b.shape[0]:
                raise PassError(f"lowrank factors of {weight} do not reduce its parameters")

    @staticmethod
    def _rewrite(gm: fx.GraphModule, node: fx.Node, in_name: str, out_name: str, source: str) -> None:
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else None
        with gm.graph.inserting_before(node):
            a = get_attr_node(gm, in_name, before=node)
            b = get_attr_node(gm, out_name, before=node)
            hidden = gm.graph.call_function(LINEAR, (x, a))
            outer = gm.graph.call_function(LINEAR, (hidden, b, bias))
        for new in (a, b, hidden):
            copy_meta(new, node, source)
        copy_meta(outer, node, source, same_value=True)
        node.replace_all_uses_with(outer)
        gm.graph.erase_node(node)

