"""Remove whole repeated blocks (`prune { method = layers, keep = [...] }`).

Every selected repeated block (`encoder.layer.i`, `blocks.i`: a child of the model's block list
that holds a selected module) whose index is not in `keep` is removed: its nodes are erased,
its weights deleted, and the uses of its output read its input instead (block i-1's output
feeds block i+1). Kept blocks keep their names, so later steps select them by their original
paths. Assumes blocks that map one hidden state to one hidden state of the same shape (extra
inputs such as the attention mask are allowed).
"""

from __future__ import annotations

import torch
from torch import fx

from planc.passes.base import PassContext, PassError, PassResult
from planc.passes.graph_utils import erase_if_unused, get_tensor, is_within, module_stack
from planc.passes.prune.common import PruneMethodPass


class LayersPass(PruneMethodPass):
    """See the module docstring."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        super().requires(gm, ctx)
        keep = self.options.keep or []
        block_list, length, indices = self._selected_blocks(gm, ctx)
        bad = [i for i in keep if i >= length]
        if bad:
            raise PassError(f"keep = {keep} names block(s) {bad} but {block_list} has {length} blocks")
        if not [i for i in indices if i not in keep]:
            raise PassError(f"prune (method = layers) keeps every selected block of {block_list}: nothing to remove")

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        with torch.no_grad():
            gm(**ctx.example_inputs)  # the shortened graph must still run

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

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
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
