"""Shared helpers for passes: find a module's nodes and tensors in an exported GraphModule.

The driver captures models with `torch.export.export(...).module()`. In that GraphModule
- a Linear is a `call_function` node `aten.linear.default(x, weight, bias?)` whose weight and
  bias are `get_attr` nodes with dotted targets (`blocks.0.attn.q_proj.weight`), held by
  nested plain modules at the same dotted paths as in the eager model;
- `node.meta["nn_module_stack"]` maps to `(module_path, class_qualname)` pairs, outermost first;
- the forward takes the eager model's keyword arguments (a pytree codegen flattens them).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

from planc.compiler.model.deferred import DEFERRED_WEIGHTS, DeferredWeight, ReadBuffers, SpillFile, sharing_deferred

LINEAR = torch.ops.aten.linear.default
EMBEDDING = torch.ops.aten.embedding.default
#: Ops that only move or view data: they follow their input's dtype and carry no cost.
VIEW_OPS = frozenset(
    {
        torch.ops.aten.view.default,
        torch.ops.aten.reshape.default,
        torch.ops.aten._unsafe_view.default,
    }
)


@dataclass(frozen=True)
class LinearSite:
    """One `aten.linear` call and where its tensors live in the GraphModule."""

    node: fx.Node
    module_path: str
    weight: str  # dotted get_attr target
    bias: str | None

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]  # type: ignore[return-value]


@dataclass(frozen=True)
class EmbeddingSite:
    """One `aten.embedding` lookup and its table."""

    node: fx.Node
    module_path: str
    weight: str


def quiet_deepcopy(obj):
    """copy.deepcopy without torch's internal pytree FutureWarning (LeafSpec) that it triggers.

    A graph's deferred weights (`DEFERRED_WEIGHTS`) stay shared: copying their never-written
    storage would cost the memory that deferring them saves."""
    deferred = obj.meta.get(DEFERRED_WEIGHTS, {}) if isinstance(obj, fx.GraphModule) else {}
    memo = sharing_deferred(obj, deferred) if deferred else {}  # a weight that left the graph (quantized) is not there
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(obj, memo)


# ----------------------------------------------------------------------------- module paths


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """`(module_path, class_name)` pairs owning `node`, outermost first ('' = root)."""
    stack = node.meta.get("nn_module_stack") or {}
    pairs = []
    for path, cls in stack.values():
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        pairs.append((str(path), cls_name.rsplit(".", 1)[-1]))
    return pairs


def owner_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that created `node` ('' if none is recorded)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def is_within(path: str, ancestor: str) -> bool:
    """True if module `path` is `ancestor` or nested inside it ('' contains everything)."""
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def within_any(path: str, targets: Iterable[str]) -> bool:
    return any(is_within(path, target) for target in targets)


def _get_attr_target(arg: object) -> str | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return str(arg.target)
    return None


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every `aten.linear` node whose weight is a get_attr, in graph order."""
    sites = []
    for node in gm.graph.find_nodes(op="call_function", target=LINEAR):
        weight = _get_attr_target(node.args[1])
        if weight is None:
            continue
        bias = _get_attr_target(node.args[2]) if len(node.args) > 2 else None
        stack = module_stack(node)
        if stack and stack[-1][1].endswith("Linear"):
            path = stack[-1][0]
        else:  # F.linear called inside another module: name it by its weight
            path = weight.rsplit(".", 1)[0]
        sites.append(LinearSite(node, path, weight, bias))
    return sites


ADDMM = torch.ops.aten.addmm.default


def conv1d_as_linear(gm: fx.GraphModule) -> int:
    """Rewrite GPT-2-style `Conv1D` projections (`addmm(b, x, W)`, W stored [in, out]) as
    `linear(x, W.T, b)` with the weight stored [out, in], so every pass (quantize, gptq, awq,
    wanda, sparsegpt, lowrank) sees one kind of projection. The parameter keeps its name, so
    selectors and reports still say `h.0.attn.c_attn`; the eager model is not touched (the
    graph owns its weights). Returns the number of projections rewritten."""
    rewritten = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=ADDMM)):
        bias, x, weight = (_get_attr_target(node.args[0]), node.args[1], _get_attr_target(node.args[2]))
        stack = module_stack(node)
        if weight is None or bias is None or node.kwargs or not (stack and stack[-1][1].endswith("Conv1D")):
            continue
        if len(node.args[2].users) != 1:
            continue
        owner_name, _, attr = weight.rpartition(".")
        owner = gm.get_submodule(owner_name)
        stored = getattr(owner, attr)
        setattr(owner, attr, torch.nn.Parameter(stored.detach().t().contiguous(), requires_grad=stored.requires_grad))
        node.target = LINEAR
        node.args = (x, node.args[2], node.args[0])
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def embedding_sites(gm: fx.GraphModule) -> list[EmbeddingSite]:
    """Every `aten.embedding` lookup whose table is a get_attr."""
    sites = []
    for node in gm.graph.find_nodes(op="call_function", target=EMBEDDING):
        weight = _get_attr_target(node.args[0])
        if weight is None:
            continue
        stack = module_stack(node)
        named = stack and stack[-1][1].endswith("Embedding")
        path = stack[-1][0] if named else weight.rsplit(".", 1)[0]
        sites.append(EmbeddingSite(node, path, weight))
    return sites


def select_linears(gm: fx.GraphModule, targets: Iterable[str]) -> list[LinearSite]:
    """Linear sites whose module is one of `targets` or nested inside one."""
    targets = list(targets)
    return [site for site in linear_sites(gm) if within_any(site.module_path, targets)]


def select_embeddings(gm: fx.GraphModule, targets: Iterable[str]) -> list[EmbeddingSite]:
    """Embedding sites whose module is exactly one of `targets` (or nested in one)."""
    targets = list(targets)
    return [site for site in embedding_sites(gm) if within_any(site.module_path, targets)]


# ----------------------------------------------------------------------------- tensors


#: `gm.meta` key of the `SpillFile` holding deferred weights that passes edited.
SPILLED_WEIGHTS = "planc_spilled_weights"


def get_tensor(gm: torch.nn.Module, dotted: str, buffers: ReadBuffers | None = None) -> torch.Tensor:
    """The tensor at `dotted`; a deferred weight is read from its checkpoint or spill file (a new
    fp32 tensor; with `buffers`, a view of them valid until their next read)."""
    load = getattr(gm, "meta", {}).get(DEFERRED_WEIGHTS, {}).get(dotted)
    if load is None:
        return stored_tensor(gm, dotted)
    return load(buffers) if buffers is not None and isinstance(load, DeferredWeight) else load()


def stored_tensor(gm: torch.nn.Module, dotted: str) -> torch.Tensor:
    """The tensor the module holds at `dotted` (a deferred weight's is empty storage of its shape)."""
    owner, _, name = dotted.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return getattr(module, name)


def scale_columns(gm: torch.nn.Module, dotted: str, factors: torch.Tensor) -> None:
    """Multiply the weight at `dotted` by `factors` per input column (W[:, j] * s_j). A deferred
    weight stays deferred: its loader scales what it reads, so it is still read once, where used."""
    loaders = getattr(gm, "meta", {}).get(DEFERRED_WEIGHTS, {})
    load = loaders.get(dotted)
    if load is not None:
        loaders[dotted] = lambda: load().float().mul_(factors)
        return
    tensor = stored_tensor(gm, dotted)
    set_tensor(gm, dotted, (tensor.detach().float() * factors).to(tensor.dtype))


def set_tensor(gm: torch.nn.Module, dotted: str, value: torch.Tensor, *, buffer: bool | None = None) -> None:
    """Store `value` at `dotted`, creating plain intermediate modules as needed.

    `buffer=None` keeps the kind (parameter or buffer) of what is there, defaulting to a
    parameter for floating tensors and a buffer for integer ones. A deferred weight given an
    fp32 value of its shape (pruned, updated) stays deferred: the value goes to the graph's
    spill file and is read back where used, so a streamed compile never holds all edited weights.
    """
    loaders = getattr(gm, "meta", {}).get(DEFERRED_WEIGHTS, {})
    if dotted in loaders:
        if value.dtype == torch.float32 and value.shape == stored_tensor(gm, dotted).shape:
            spill = gm.meta.get(SPILLED_WEIGHTS) or gm.meta.setdefault(SPILLED_WEIGHTS, SpillFile())
            loaders[dotted] = spill.store(value)
            return
        del loaders[dotted]  # a new shape or dtype: held like any tensor
    owner_path_, _, name = dotted.rpartition(".")
    module = gm
    for part in owner_path_.split(".") if owner_path_ else []:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if buffer is None:
        if name in module._parameters:
            buffer = False
        elif name in module._buffers:
            buffer = True
        else:
            buffer = not value.is_floating_point()
    if hasattr(module, name):
        delattr(module, name)
    if buffer:
        module.register_buffer(name, value.detach())
    else:
        module.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=False))


def delete_tensor(gm: torch.nn.Module, dotted: str) -> None:
    owner, _, name = dotted.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    delattr(module, name)


def get_attr_node(gm: fx.GraphModule, target: str, *, before: fx.Node) -> fx.Node:
    """The get_attr node for `target`, created just before `before` if the graph has none."""
    for node in gm.graph.find_nodes(op="get_attr", target=target):
        return node
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(target)


def erase_if_unused(gm: fx.GraphModule, node: fx.Node | None) -> bool:
    """Erase a get_attr node without users and its tensor if no other node reads it."""
    if node is None or node.op != "get_attr" or node.users:
        return False
    target = str(node.target)
    gm.graph.erase_node(node)
    if not any(n.target == target for n in gm.graph.find_nodes(op="get_attr", target=target)):
        delete_tensor(gm, target)
    return True


# ----------------------------------------------------------------------------- provenance


def mark(node: fx.Node, source: str) -> fx.Node:
    """Record the plan line that created or changed `node`.

    `planc_source` is the latest such line; `planc_history` lists all of them in order.
    """
    node.meta["planc_source"] = source
    history = node.meta.setdefault("planc_history", [])
    if not history or history[-1] != source:
        history.append(source)
    return node


def copy_meta(new: fx.Node, old: fx.Node, source: str, *, same_value: bool = False) -> fx.Node:
    """Give a replacement node the module stack of the node it replaces, plus provenance.

    `same_value`: the new node computes a tensor of the same shape and dtype, so the traced
    value metadata (`val`, `tensor_meta`) still holds.
    """
    keys = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "planc_history")
    if same_value:
        keys += ("val", "tensor_meta")
    for key in keys:
        if key in old.meta:
            new.meta[key] = list(old.meta[key]) if key == "planc_history" else old.meta[key]
    return mark(new, source)


# ----------------------------------------------------------------------------- running


def flat_inputs(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The placeholder values for `gm` called with keyword `inputs` (for fx.Interpreter)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec(((), dict(inputs)), info.in_spec))
    names = [str(node.target) for node in gm.graph.find_nodes(op="placeholder")]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise KeyError(f"the graph needs inputs {missing}, got {sorted(inputs)}")
    return [inputs[name] for name in names]


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Concrete shape recorded by `ShapeRecorder`, else the traced one if fully static."""
    shape = node.meta.get("planc_shape")
    if shape is not None:
        return shape
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape):
        return tuple(val.shape)
    return None


class ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores every tensor result's concrete shape in meta['planc_shape']."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        n.meta.pop("planc_shape", None)
        n.meta.pop("planc_dtype", None)
        if isinstance(result, torch.Tensor):
            n.meta["planc_shape"] = tuple(result.shape)
            n.meta["planc_dtype"] = result.dtype
        elif isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
            n.meta["planc_dtype"] = result[0].dtype  # multi-output op: dtype of its first tensor
        return result


def record_shapes(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        ShapeRecorder(gm).run(*flat_inputs(gm, inputs))


def placeholder_values(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Like `flat_inputs`, also for a graph exported with positional arguments: keyword inputs
    are then matched to placeholders by name."""
    try:
        return flat_inputs(gm, inputs)
    except (IndexError, KeyError, TypeError, ValueError):
        return [inputs[str(node.target)] for node in gm.graph.find_nodes(op="placeholder")]
