"""Prune weights of the selected Linear layers: unstructured, N:M, or whole heads / MLP channels.

Rewrite rules
1. `method = magnitude`, `scope = local`: in each selected Linear weight, the
   `round(sparsity * numel)` entries of smallest |w| become 0 (shape unchanged).
2. `method = magnitude`, `scope = global`: one ranking over all selected weights together;
   the `round(sparsity * total)` smallest |w| become 0, so layers end with different sparsity.
3. `method = nm`: in every group of `m` consecutive weights along the input dimension, all but
   the `n` largest |w| become 0 (needs in_features % m == 0).
4. `method = heads`: in each selected attention group, the `round(sparsity * heads)` heads of
   lowest importance (l1/l2 norm of the head's q/k/v rows and out-projection columns) are
   removed: q/k/v weights and biases lose the head's rows, the out projection loses the
   matching input columns. Parameters physically shrink; LayerNorm and the out-projection bias
   are untouched. A `view`/`reshape` between the q/k/v projections and the out projection that
   spells the head count (or heads * head_dim) as a constant gets the new value.
5. `method = channels`: in each selected MLP group, the `round(sparsity * channels)`
   intermediate channels of lowest importance are removed: rows (and bias) of the
   up-projection(s), columns of the down-projection.
6. `method = layers`: every selected repeated block (`encoder.layer.i`, `blocks.i`: a child
   of the model's block list that holds a selected module) whose index is not in `keep` is
   removed: its nodes are erased, its weights deleted, and the uses of its output read its
   input instead (block i-1's output feeds block i+1). Kept blocks keep their names, so later
   steps select them by their original paths.

Selectors. Magnitude and N:M act on the selected Linear modules (a selected container means
all Linears inside it). Heads and channels act on groups recognised by name:
attention = `{q_proj,k_proj,v_proj,out_proj|o_proj}` (example GPT `blocks.i.attn`) or
`{self.query,self.key,self.value,output.dense}` (HF BERT `encoder.layer.i.attention`);
MLP = `{fc_in,fc_out}`, `{fc1,fc2}`, `{intermediate.dense,output.dense}` (BERT layer),
`{gate_proj+up_proj,down_proj}`. A group is pruned when a target is its root module, one of
its Linears, or an ancestor of one of them (so `Linear`, `Attention`, `BertSelfAttention`,
`MLP`, `BertIntermediate` selectors all work).

Assumes `aten.linear` nodes with get_attr weights (torch.export capture) and multi-head
attention with equal q/k/v widths (no grouped-query attention); for layers, blocks that map
one hidden state to one hidden state of the same shape (extra inputs such as the attention
mask are allowed). Guarantees the requested zeros/pattern, and for structured methods a graph
that still runs at any batch/sequence.
`schedule = gradual` belongs to the training target and is rejected here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from passes.base import GraphPass, PassContext, PassError, PassResult
from passes.graph_utils import (
    VIEW_OPS,
    LinearSite,
    get_tensor,
    is_within,
    linear_sites,
    erase_if_unused,
    mark,
    module_stack,
    owner_path,
    select_linears,
    set_tensor,
)
from passes.options import Prune

log = logging.getLogger(__name__)

ATTENTION_LAYOUTS: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("self.query", "self.key", "self.value", "output.dense"),
)
#: (Linears whose output rows are channels, Linears whose input columns are channels).
MLP_LAYOUTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("fc_in",), ("fc_out",)),
    (("fc1",), ("fc2",)),
    (("intermediate.dense",), ("output.dense",)),
    (("gate_proj", "up_proj"), ("down_proj",)),
)
#: Attributes that name the head size on common attention modules (fallback to the graph).
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")


@dataclass(frozen=True)
class StructuredGroup:
    """Linears whose channels must be removed together.

    `rows`: Linears whose output features are the channels; `cols`: Linears whose input
    features are the channels.
    """

    kind: str  # "attention" | "mlp"
    root: str
    rows: tuple[LinearSite, ...]
    cols: tuple[LinearSite, ...]
    #: Members already split into several Linears (lowrank): the group cannot be pruned.
    factored: tuple[str, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(site.module_path for site in self.rows + self.cols)

    def selected_by(self, targets: frozenset[str]) -> bool:
        return any(t == self.root or any(is_within(m, t) for m in self.members) for t in targets)


def find_groups(gm: fx.GraphModule, kind: str) -> list[StructuredGroup]:
    """Attention or MLP groups present in the graph, in graph order."""
    by_path: dict[str, LinearSite] = {}
    factored: set[str] = set()
    for site in linear_sites(gm):
        if by_path.setdefault(site.module_path, site).weight != site.weight:
            factored.add(site.module_path)  # e.g. two thin Linears after lowrank
    layouts = (
        [((q, k, v), (o,)) for q, k, v, o in ATTENTION_LAYOUTS] if kind == "attention" else list(MLP_LAYOUTS)
    )
    groups: dict[str, StructuredGroup] = {}
    for path in by_path:
        for row_names, col_names in layouts:
            first = row_names[0]
            if not path.endswith(first) or (path != first and not path.endswith("." + first)):
                continue
            root = path[: -len(first)].rstrip(".")
            prefix = root + "." if root else ""
            names = [prefix + name for name in row_names + col_names]
            if root in groups or not all(name in by_path for name in names):
                continue
            sites = [by_path[name] for name in names]
            rows, cols = tuple(sites[: len(row_names)]), tuple(sites[len(row_names) :])
            groups[root] = StructuredGroup(kind, root, rows, cols, tuple(sorted(factored.intersection(names))))
    return list(groups.values())


def _importance(slices: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Per-channel importance: the l1 or l2 norm over all of a channel's weights.

    Each slice is [channels, ...] (rows of row-Linears, transposed columns of col-Linears).
    `activation` (with or without `reconstruct`) is measured by the training program, which
    saves the heads/channels it removed as zeros: on those weights the l2 norm finds them again.
    """
    if norm == "l1":
        return sum(s.abs().flatten(1).sum(1) for s in slices)
    return torch.sqrt(sum(s.pow(2).flatten(1).sum(1) for s in slices))


class PrunePass(GraphPass[Prune]):
    """See the module docstring for the rewrite rules."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        opts = self.options
        if opts.schedule == "gradual":
            raise PassError(
                "schedule = gradual ramps sparsity during training and is applied by the train target;"
                " use schedule = oneshot to prune at compile time"
            )
        if opts.method == "layers":
            block_list, length, indices = self._selected_blocks(gm, ctx)
            bad = [i for i in opts.keep or [] if i >= length]
            if bad:
                raise PassError(f"keep = {opts.keep} names block(s) {bad} but {block_list} has {length} blocks")
            if not [i for i in indices if i not in (opts.keep or [])]:
                raise PassError(f"prune (method = layers) keeps every selected block of {block_list}: nothing to remove")
            return
        if opts.method in ("magnitude", "nm"):
            sites = select_linears(gm, ctx.targets)
            if not sites:
                raise PassError(f"prune ({opts.method}) found no Linear layer in the selection {sorted(ctx.targets)[:5]}")
            if opts.method == "nm":
                bad = [s.module_path for s in sites if get_tensor(gm, s.weight).shape[1] % opts.m]
                if bad:
                    raise PassError(f"N:M pruning with m = {opts.m} needs in_features divisible by {opts.m}; not so for {bad[:3]}")
        else:
            kind = "attention" if opts.method == "heads" else "mlp"
            if not self._groups(gm, ctx, kind):
                what = "attention blocks (q/k/v/out projections)" if kind == "attention" else "MLP blocks"
                raise PassError(
                    f"prune (method = {opts.method}) found no {what} with float Linear layers in the selection"
                    f" {sorted(ctx.targets)[:5]} (structured pruning must run before quantize)"
                )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        method = self.options.method
        if method == "layers":
            return self._drop_layers(gm, ctx)
        if method == "magnitude":
            return self._magnitude(gm, ctx)
        if method == "nm":
            return self._nm(gm, ctx)
        return self._structured(gm, ctx, "attention" if method == "heads" else "mlp")

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        opts = self.options
        if opts.method == "nm":
            for weight in self._unique_weights(gm, ctx):
                w = get_tensor(gm, weight)
                nonzero = (w.reshape(w.shape[0], -1, opts.m) != 0).sum(-1)
                if int(nonzero.max()) > opts.n:
                    raise PassError(f"{weight} breaks the {opts.n}:{opts.m} pattern after pruning")
        elif opts.method == "magnitude":
            weights = [get_tensor(gm, t) for t in self._unique_weights(gm, ctx)]
            zeros = sum(int((w == 0).sum()) for w in weights)
            total = sum(w.numel() for w in weights)
            needed = sum(round(opts.sparsity * w.numel()) for w in weights) if opts.scope == "local" else round(opts.sparsity * total)
            if zeros < needed:
                raise PassError(f"magnitude pruning reached {zeros}/{total} zeros, expected at least {needed}")
        else:
            with torch.no_grad():
                gm(**ctx.example_inputs)  # the shrunk graph must still run

    # ------------------------------------------------------------------ unstructured

    def _unique_weights(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        return list(dict.fromkeys(site.weight for site in select_linears(gm, ctx.targets)))

    def _mark_users(self, gm: fx.GraphModule, weights: list[str], source: str) -> None:
        wanted = set(weights)
        for site in linear_sites(gm):
            if site.weight in wanted:
                mark(site.node, source)

    def _magnitude(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sparsity = self.options.sparsity
        weights = self._unique_weights(gm, ctx)
        tensors = [get_tensor(gm, name).detach() for name in weights]
        if self.options.scope == "global":
            flat = torch.cat([t.abs().flatten().float() for t in tensors])
            k = round(sparsity * flat.numel())
            mask = torch.ones_like(flat, dtype=torch.bool)
            mask[torch.argsort(flat, stable=True)[:k]] = False
            masks = torch.split(mask, [t.numel() for t in tensors])
        else:
            masks = []
            for t in tensors:
                flat = t.abs().flatten().float()
                mask = torch.ones_like(flat, dtype=torch.bool)
                mask[torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]] = False
                masks.append(mask)
        per_layer = {}
        for name, t, mask in zip(weights, tensors, masks, strict=True):
            pruned = t * mask.reshape(t.shape).to(t.dtype)
            set_tensor(gm, name, pruned)
            per_layer[name.rsplit(".", 1)[0]] = round(float((pruned == 0).float().mean()), 6)
        self._mark_users(gm, weights, ctx.source)
        total = sum(t.numel() for t in tensors)
        zeros = sum(int((get_tensor(gm, n) == 0).sum()) for n in weights)
        summary = f"pruned {len(weights)} Linear to {zeros / total:.1%} sparsity ({self.options.scope} magnitude)"
        return PassResult(summary, {"method": "magnitude", "scope": self.options.scope, "sparsity": per_layer, "zeros": zeros, "total": total})

    def _nm(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        n, m = self.options.n, self.options.m
        weights = self._unique_weights(gm, ctx)
        per_layer = {}
        for name in weights:
            w = get_tensor(gm, name).detach()
            groups = w.reshape(w.shape[0], -1, m)
            keep = groups.abs().topk(n, dim=-1).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
            pruned = (groups * mask.to(w.dtype)).reshape(w.shape)
            set_tensor(gm, name, pruned)
            per_layer[name.rsplit(".", 1)[0]] = round(float((pruned == 0).float().mean()), 6)
        self._mark_users(gm, weights, ctx.source)
        summary = f"pruned {len(weights)} Linear to {n}:{m} sparsity"
        return PassResult(summary, {"method": "nm", "n": n, "m": m, "sparsity": per_layer})

    # ------------------------------------------------------------------ structured

    def _groups(self, gm: fx.GraphModule, ctx: PassContext, kind: str) -> list[StructuredGroup]:
        groups = [g for g in find_groups(gm, kind) if g.selected_by(ctx.targets)]
        for group in groups:
            if group.factored:
                raise PassError(f"{group.factored[0]} is already factored; run structured pruning before lowrank")
        return groups

    def _structured(self, gm: fx.GraphModule, ctx: PassContext, kind: str) -> PassResult:
        per_group = {}
        params_before = params_after = 0
        for group in self._groups(gm, ctx, kind):
            before = self._group_params(gm, group)
            if kind == "attention":
                info = self._prune_heads(gm, ctx, group)
            else:
                info = self._prune_channels(gm, ctx, group)
            after = self._group_params(gm, group)
            info.update(params_before=before, params_after=after)
            per_group[group.root] = info
            params_before += before
            params_after += after
        unit = "heads" if kind == "attention" else "channels"
        removed = sum(g["removed"] for g in per_group.values())
        total = sum(g["total"] for g in per_group.values())
        summary = (
            f"removed {removed}/{total} {unit} in {len(per_group)} blocks; "
            f"their params {params_before} -> {params_after} ({1 - params_after / max(params_before, 1):.1%} fewer)"
        )
        return PassResult(summary, {"method": self.options.method, "groups": per_group, "params_before": params_before, "params_after": params_after})

    @staticmethod
    def _group_params(gm: fx.GraphModule, group: StructuredGroup) -> int:
        names = {s.weight for s in group.rows + group.cols} | {s.bias for s in group.rows + group.cols if s.bias}
        return sum(get_tensor(gm, name).numel() for name in names)

    def _n_drop(self, total: int) -> int:
        return min(round(self.options.sparsity * total), total - 1)

    def _shrink(self, gm: fx.GraphModule, group: StructuredGroup, index: torch.Tensor, source: str) -> None:
        """Keep only `index` of the channel dimension in every Linear of the group."""
        for site in group.rows:
            set_tensor(gm, site.weight, get_tensor(gm, site.weight).detach()[index].clone())
            if site.bias:
                set_tensor(gm, site.bias, get_tensor(gm, site.bias).detach()[index].clone())
            mark(site.node, source)
        for site in group.cols:
            set_tensor(gm, site.weight, get_tensor(gm, site.weight).detach()[:, index].clone())
            mark(site.node, source)

    def _prune_channels(self, gm: fx.GraphModule, ctx: PassContext, group: StructuredGroup) -> dict:
        slices = [get_tensor(gm, s.weight).detach() for s in group.rows]
        slices += [get_tensor(gm, s.weight).detach().t() for s in group.cols]
        widths = {s.shape[0] for s in slices}
        if len(widths) != 1:
            raise PassError(f"MLP {group.root}: channel counts differ between its Linears ({sorted(widths)})")
        channels = widths.pop()
        n_drop = self._n_drop(channels)
        importance = _importance(slices, self.options.importance)
        keep = torch.sort(torch.topk(importance, channels - n_drop).indices).values
        self._shrink(gm, group, keep, ctx.source)
        return {"removed": n_drop, "total": channels, "sparsity": n_drop / channels, "kept": keep.tolist()}

    def _prune_heads(self, gm: fx.GraphModule, ctx: PassContext, group: StructuredGroup) -> dict:
        q, k, v = group.rows
        (out,) = group.cols
        widths = {get_tensor(gm, s.weight).shape[0] for s in (q, k, v)}
        if len(widths) != 1:
            raise PassError(
                f"attention {group.root}: q/k/v widths differ ({sorted(widths)}); grouped-query attention is not supported"
            )
        width = widths.pop()
        head_dim = self._head_dim(gm, ctx, group)
        if width % head_dim:
            raise PassError(f"attention {group.root}: width {width} is not a multiple of head size {head_dim}")
        heads = width // head_dim
        n_drop = self._n_drop(heads)
        # [heads, head_dim, d_model] views: q/k/v rows and out-projection columns of each head.
        slices = [get_tensor(gm, s.weight).detach().reshape(heads, head_dim, -1) for s in (q, k, v)]
        slices.append(get_tensor(gm, out.weight).detach().t().reshape(heads, head_dim, -1))
        importance = _importance(slices, self.options.importance)
        keep_heads = torch.sort(torch.topk(importance, heads - n_drop).indices).values
        rows = (keep_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        if n_drop:
            self._shrink(gm, group, rows, ctx.source)
            self._rewrite_head_constants(gm, group, heads, heads - n_drop, head_dim, ctx.source)
        return {"removed": n_drop, "total": heads, "sparsity": n_drop / heads, "head_dim": head_dim, "kept": keep_heads.tolist()}

    def _head_dim(self, gm: fx.GraphModule, ctx: PassContext, group: StructuredGroup) -> int:
        """Head size: the last dim of the view that splits q into heads, else a module attribute."""
        for user in group.rows[0].node.users:
            if user.target in VIEW_OPS:
                shape = user.args[1]
                if isinstance(shape, (list, tuple)) and len(shape) >= 4 and isinstance(shape[-1], int) and shape[-1] > 0:
                    return shape[-1]
        try:
            module = ctx.model.get_submodule(group.root)
        except AttributeError:
            module = None
        for sub in [] if module is None else list(module.modules()):
            for attr in HEAD_DIM_ATTRS:
                value = getattr(sub, attr, None)
                if isinstance(value, int) and value > 0:
                    return value
        raise PassError(f"attention {group.root}: cannot tell the head size (no view into heads, no head_dim attribute)")

    @staticmethod
    def _rewrite_head_constants(
        gm: fx.GraphModule, group: StructuredGroup, heads: int, new_heads: int, head_dim: int, source: str
    ) -> None:
        """Fix views between q/k/v and the out projection that spell the head count as a constant."""
        forward: set[fx.Node] = set()
        frontier = [site.node for site in group.rows]
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user not in forward and user is not group.cols[0].node:
                    forward.add(user)
                    frontier.append(user)
        backward: set[fx.Node] = set()
        frontier = [group.cols[0].node]
        while frontier:
            node = frontier.pop()
            for arg in node.all_input_nodes:
                if arg not in backward:
                    backward.add(arg)
                    frontier.append(arg)
        for node in forward & backward:
            if node.target not in VIEW_OPS or not is_within(owner_path(node), group.root):
                continue
            shape = list(node.args[1])
            changed = False
            for i, dim in enumerate(shape):
                if not isinstance(dim, int):
                    continue
                if dim == heads * head_dim:
                    shape[i], changed = new_heads * head_dim, True
                elif dim == heads and i + 1 < len(shape) and shape[i + 1] == head_dim:
                    shape[i], changed = new_heads, True
            if changed:
                node.args = (node.args[0], shape, *node.args[2:])
                mark(node, source)

    # ------------------------------------------------------------------ layers

    def _selected_blocks(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[str, int, list[int]]:
        """The model's block list holding the selection, its length, and the indices of its
        selected blocks still in the graph.

        The block list is the longest `nn.ModuleList` of the eager model that contains a
        selected module (or is inside one); its blocks that are still in the graph count.
        """
        lists = [
            (name, module) for name, module in ctx.model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and name
        ]
        chosen: list[tuple[str, int]] = []
        for name, module in lists:
            selected = [
                i for i in range(len(module))
                if any(is_within(t, f"{name}.{i}") or is_within(f"{name}.{i}", t) for t in ctx.targets)
            ]
            if selected:
                chosen.append((name, len(module)))
        if not chosen:
            raise PassError(
                f"prune (method = layers) found no repeated blocks (a ModuleList of layers) in the selection {sorted(ctx.targets)[:5]}"
            )
        if len(chosen) > 1:
            raise PassError(
                f"prune (method = layers): the selection spans several block lists {[c[0] for c in chosen]}; narrow it to one"
            )
        name, length = chosen[0]
        present = {i for i in range(length) if self._block_nodes(gm, f"{name}.{i}")}
        indices = [
            i for i in sorted(present)
            if any(is_within(t, f"{name}.{i}") or is_within(f"{name}.{i}", t) for t in ctx.targets)
        ]
        if not indices:
            raise PassError(f"prune (method = layers): no selected block of {name} is left in the graph")
        return name, length, indices

    @staticmethod
    def _block_nodes(gm: fx.GraphModule, path: str) -> list[fx.Node]:
        """Nodes created inside module `path` (by their recorded module stack), in graph order."""
        return [
            node for node in gm.graph.nodes
            if node.op == "call_function" and any(is_within(p, path) for p, _ in module_stack(node))
        ]

    @staticmethod
    def _same_value(a: fx.Node, b: fx.Node) -> bool:
        va, vb = a.meta.get("val"), b.meta.get("val")
        if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
            return False
        return va.dtype == vb.dtype and str(tuple(va.shape)) == str(tuple(vb.shape))

    def _drop_block(self, gm: fx.GraphModule, path: str) -> int:
        """Remove block `path` from the graph, its input taking the place of its output.

        Returns how many parameter elements the block held.
        """
        nodes = self._block_nodes(gm, path)
        inside = set(nodes)
        outputs = [n for n in nodes if any(user not in inside for user in n.users)]
        if len(outputs) != 1:
            raise PassError(
                f"block {path} has {len(outputs)} values used outside it ({[n.name for n in outputs][:4]});"
                " method = layers removes blocks that return one hidden state"
            )
        (output,) = outputs
        external = list(dict.fromkeys(
            arg for n in nodes for arg in n.all_input_nodes if arg not in inside and arg.op != "get_attr"
        ))
        candidates = [arg for arg in external if self._same_value(arg, output)]
        if len(candidates) != 1:
            raise PassError(
                f"block {path}: cannot tell its hidden-state input ({len(candidates)} inputs have the shape of its"
                " output); method = layers removes blocks mapping one hidden state to the next"
            )
        output.replace_all_uses_with(candidates[0], delete_user_cb=lambda user: user not in inside)
        weights: list[fx.Node] = []
        for node in reversed(nodes):
            weights += [arg for arg in node.all_input_nodes if arg.op == "get_attr"]
            gm.graph.erase_node(node)
        removed = 0
        for node in dict.fromkeys(weights):
            if not node.users:
                tensor = get_tensor(gm, str(node.target))
                if erase_if_unused(gm, node):
                    removed += tensor.numel()
        return removed

    def _drop_layers(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        block_list, _, indices = self._selected_blocks(gm, ctx)
        keep = set(self.options.keep or [])
        dropped = [i for i in indices if i not in keep]
        removed = 0
        for index in dropped:
            removed += self._drop_block(gm, f"{block_list}.{index}")
        gm.delete_all_unused_submodules()
        kept = [i for i in indices if i in keep]
        summary = f"removed {len(dropped)} of {len(indices)} selected blocks of {block_list} (kept {kept}); {removed} params fewer"
        return PassResult(
            summary, {"method": "layers", "blocks": block_list, "dropped": dropped, "kept": kept, "params_removed": removed}
        )
