"""Cut the graph into pipeline stages of balanced cost with torch.fx's `split_module`.

Rewrite rules
1. Units: with `boundary = blocks`, the repeated blocks found in `nn_module_stack` (the
   longest run `prefix.0, prefix.1, ...`, e.g. `blocks.i` or `encoder.layer.i`) plus what
   comes before (embeddings) and after (head) them; with `boundary = nodes`, every node.
   Nodes outside any block join the unit of the block before them (so units follow graph
   order); parameters join the unit of their first user.
2. Cost of a unit: `params` (elements of the parameters/buffers it reads), `flops`
   (2*M*N*K for linear/matmul, 4*b*h*s*t*d for attention, one per output element
   otherwise, from shapes at the example inputs) or `time` (measured CPU time per node).
3. Consecutive units are grouped into `stages` non-empty stages minimising the largest stage
   cost (exact dynamic programme over prefix sums).
4. `split_module` builds a GraphModule with `submod_0 .. submod_{stages-1}` called in order;
   every parameter is moved into the stage that uses it (shared ones into each user stage),
   and the pytree calling convention of the original module is kept.

Guarantees: the split module returns exactly what the unsplit graph returned on the example
inputs; details give per-stage cost, units and max/mean imbalance. Run it last.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict

import numpy as np
import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from planc.passes.base import GraphPass, PassContext, PassError, PassResult
from planc.passes.graph_utils import (
    LINEAR,
    flat_inputs,
    get_tensor,
    module_stack,
    quiet_deepcopy,
    record_shapes,
    set_tensor,
    tensor_shape,
)
from planc.passes.partition import Partition

log = logging.getLogger(__name__)

MATMUL_OPS = {
    torch.ops.aten.matmul.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.baddbmm.default,
}
SDPA = torch.ops.aten.scaled_dot_product_attention.default
_BLOCK = re.compile(r"(.*)\.(\d+)")


# ----------------------------------------------------------------------------- units


def find_blocks(gm: fx.GraphModule) -> tuple[str, int] | None:
    """(prefix, count) of the longest run of numbered sibling modules, e.g. ('blocks', 12)."""
    indices: dict[str, set[int]] = defaultdict(set)
    for node in gm.graph.nodes:
        for path, _ in module_stack(node):
            match = _BLOCK.fullmatch(path)
            if match:
                indices[match.group(1)].add(int(match.group(2)))
    if not indices:
        return None
    prefix = max(indices, key=lambda p: (len(indices[p]), -len(p)))
    return prefix, max(indices[prefix]) + 1


def _block_of(node: fx.Node, prefix: str) -> int | None:
    for path, _ in module_stack(node):
        match = _BLOCK.fullmatch(path)
        if match and match.group(1) == prefix:
            return int(match.group(2))
    return None


def assign_units(gm: fx.GraphModule, boundary: str) -> tuple[dict[fx.Node, int], list[str]]:
    """Unit index of every compute node (monotone in graph order) and a label per unit."""
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    if boundary == "nodes":
        return {n: i for i, n in enumerate(compute)}, [n.name for n in compute]
    found = find_blocks(gm)
    if found is None:
        raise PassError("partition found no repeated blocks (like blocks.0, blocks.1, ...); use boundary = nodes")
    prefix, count = found
    unit_of: dict[fx.Node, int] = {}
    current = 0
    for node in compute:
        block = _block_of(node, prefix)
        if block is not None:
            current = max(current, block + 1)
        elif current > 0 and _in_other_module(node, prefix):
            current = count + 1  # a named module after the blocks (ln_f, lm_head, pooler)
        unit_of[node] = current
    labels = ["(before blocks)"] + [f"{prefix}.{i}" for i in range(count)] + ["(after blocks)"]
    return unit_of, labels


def _in_other_module(node: fx.Node, prefix: str) -> bool:
    return any(path and not (path == prefix or path.startswith(prefix + ".")) for path, _ in module_stack(node))


# ----------------------------------------------------------------------------- costs


def node_flops(node: fx.Node) -> float:
    out = tensor_shape(node)
    if out is None:
        return 0.0
    out_numel = float(np.prod(out)) if out else 1.0
    if node.target == SDPA:
        q, k = (tensor_shape(a) for a in node.args[:2])
        if q and k:
            return 4.0 * float(np.prod(q[:-1])) * k[-2] * q[-1]
    is_planc_linear = str(node.target).startswith("planc.linear")
    if node.target == LINEAR or node.target in MATMUL_OPS or is_planc_linear:
        # addmm/baddbmm(bias, a, b): the reduced dimension is the last of `a`.
        lhs = node.args[1] if node.target in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else node.args[0]
        x = tensor_shape(lhs) if isinstance(lhs, fx.Node) else None
        if x:
            return 2.0 * out_numel * x[-1]
    return out_numel


def node_times(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], repeats: int = 5) -> dict[fx.Node, float]:
    """CPU seconds of every node: the fastest of `repeats` interpreted runs after a warm-up.

    The minimum is the least disturbed by other processes sharing the machine.
    """
    samples: dict[fx.Node, list[float]] = defaultdict(list)

    class Timer(fx.Interpreter):
        def run_node(self, n: fx.Node):
            start = time.perf_counter()
            result = super().run_node(n)
            samples[n].append(time.perf_counter() - start)
            return result

    args = flat_inputs(gm, inputs)
    with torch.no_grad():
        Timer(gm).run(*args)
        samples.clear()
        for _ in range(repeats):
            Timer(gm).run(*args)
    return {n: min(v) for n, v in samples.items()}


def unit_costs(gm: fx.GraphModule, unit_of: dict[fx.Node, int], n_units: int, balance: str, inputs: dict) -> np.ndarray:
    costs = np.zeros(n_units)
    if balance == "params":
        seen: set[str] = set()
        for node in gm.graph.find_nodes(op="get_attr"):
            users = [unit_of[u] for u in node.users if u in unit_of]
            value = get_tensor(gm, str(node.target))
            if users and isinstance(value, torch.Tensor) and node.target not in seen:
                seen.add(str(node.target))
                costs[min(users)] += value.numel()
        return costs
    if balance == "flops":
        record_shapes(gm, inputs)
        for node, unit in unit_of.items():
            costs[unit] += node_flops(node)
        return costs
    times = node_times(gm, inputs)
    for node, unit in unit_of.items():
        costs[unit] += times.get(node, 0.0)
    return costs


def balanced_cuts(costs: np.ndarray, stages: int) -> list[int]:
    """Start index of each stage minimising the largest stage sum (exact DP over prefix sums)."""
    n = len(costs)
    if n < stages:
        raise PassError(f"cannot cut {n} units into {stages} stages")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    # best[s][j]: minimal max cost splitting units [0, j) into s+1 stages.
    best = np.full((stages, n + 1), np.inf)
    choice = np.zeros((stages, n + 1), dtype=int)
    best[0, 1:] = prefix[1:]
    for s in range(1, stages):
        for j in range(s + 1, n + 1):
            i = np.arange(s, j)  # last stage covers [i, j)
            candidate = np.maximum(best[s - 1, i], prefix[j] - prefix[i])
            k = int(np.argmin(candidate))
            best[s, j], choice[s, j] = candidate[k], i[k]
    starts, j = [], n
    for s in range(stages - 1, 0, -1):
        j = choice[s, j]
        starts.append(int(j))
    return [0] + starts[::-1]


# ----------------------------------------------------------------------------- pass


class PartitionPass(GraphPass[Partition]):
    """See the module docstring for the rewrite rules."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if any(name.startswith("submod_") for name, _ in gm.named_children()):
            raise PassError("the graph is already partitioned")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        unit_of, labels = assign_units(gm, opts.boundary)
        costs = unit_costs(gm, unit_of, len(labels), opts.balance, ctx.example_inputs)
        used = sorted(set(unit_of.values()))  # drop units without nodes
        remap = {u: i for i, u in enumerate(used)}
        costs, labels = costs[used], [labels[u] for u in used]
        starts = balanced_cuts(costs, opts.stages)
        stage_of_unit = np.searchsorted(np.array(starts), np.arange(len(costs)), side="right") - 1
        stage_of = {node: int(stage_of_unit[remap[unit]]) for node, unit in unit_of.items()}

        with torch.no_grad():
            self._reference = gm(**ctx.example_inputs)
        split = split_module(gm, None, lambda node: stage_of[node], keep_original_order=True)
        _localize_tensors(split)
        split.graph._codegen = quiet_deepcopy(gm.graph._codegen)
        split.recompile()
        for name, submod in split.named_children():
            if name.startswith("submod_"):
                for node in submod.graph.nodes:
                    node.meta.setdefault("planc_source", ctx.source)

        ends = starts[1:] + [len(costs)]
        stage_costs = [float(costs[a:b].sum()) for a, b in zip(starts, ends)]
        mean = sum(stage_costs) / len(stage_costs)
        imbalance = max(stage_costs) / mean if mean > 0 else 1.0
        stages = [
            {"stage": i, "cost": c, "units": [labels[a], labels[b - 1]] if b - a > 1 else [labels[a]]}
            for i, (a, b, c) in enumerate(zip(starts, ends, stage_costs))
        ]
        details = {"balance": opts.balance, "boundary": opts.boundary, "stages": stages, "imbalance": imbalance}
        summary = f"{opts.stages} stages by {opts.balance}, max/mean cost {imbalance:.3f}"
        return PassResult(summary, details, graph=split)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        with torch.no_grad():
            got = gm(**ctx.example_inputs)
        ref_leaves = torch.utils._pytree.tree_leaves(self._reference)
        got_leaves = torch.utils._pytree.tree_leaves(got)
        if len(ref_leaves) != len(got_leaves) or not all(
            torch.equal(a, b) for a, b in zip(ref_leaves, got_leaves) if isinstance(a, torch.Tensor)
        ):
            raise PassError("the partitioned graph does not reproduce the unpartitioned output")


def _localize_tensors(split: fx.GraphModule) -> None:
    """Move parameters the root passes into a stage into that stage's own module."""
    graph = split.graph
    for call in list(graph.find_nodes(op="call_module")):
        submod = split.get_submodule(str(call.target))
        if not isinstance(submod, fx.GraphModule):
            continue
        placeholders = list(submod.graph.find_nodes(op="placeholder"))
        first_body = next(n for n in submod.graph.nodes if n.op != "placeholder")
        keep_args = []
        for arg, placeholder in zip(call.args, placeholders, strict=True):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                target = str(arg.target)
                set_tensor(submod, target, get_tensor(split, target))
                with submod.graph.inserting_before(first_body):
                    attr = submod.graph.get_attr(target)
                attr.meta = dict(placeholder.meta)
                placeholder.replace_all_uses_with(attr)
                submod.graph.erase_node(placeholder)
            else:
                keep_args.append(arg)
        call.args = tuple(keep_args)
        submod.recompile()
    for node in list(graph.find_nodes(op="get_attr")):
        if not node.users:
            target = str(node.target)
            graph.erase_node(node)
            owner, _, name = target.rpartition(".")
            module = split.get_submodule(owner) if owner else split
            if hasattr(module, name):
                delattr(module, name)
    _drop_empty_modules(split)


def _drop_empty_modules(root: torch.nn.Module) -> None:
    """Remove plain container modules left empty after moving tensors into stages."""
    for name, child in list(root.named_children()):
        if isinstance(child, fx.GraphModule):
            continue
        _drop_empty_modules(child)
        if type(child) is torch.nn.Module and not any(True for _ in child.parameters()) and not any(
            True for _ in child.buffers()
        ) and not any(True for _ in child.children()):
            delattr(root, name)
