"""Coupled structure of a captured transformer, found by following the fx graph's data flow.

Structured pruning must remove the same heads from q, k, v and the out projection, and the
same channels from an MLP's up (and gate) and down projections. Instead of name tables, this
module follows the graph (like Torch-Pruning's DependencyGraph): every projection's output
features get integer labels, and the labels are pushed through the graph's shape and
elementwise ops exactly as the ops move the data. Where labels meet, they are coupled:
- an elementwise op of two projection outputs (gate * up) couples them position by position;
- an attention op (scaled_dot_product_attention, or matmul(q, k^T) ... matmul(p, v)) couples
  everything inside one head: its q, k, v features and the attention output of that head;
  with grouped-query attention a k/v head and all its query heads end in one class;
- a projection reading labelled features (out / down projection) couples its input columns.
The classes of coupled features are the prunable units (heads, kv-head groups, channels).
Fused projections (GPT-2 `c_attn`, GPT-NeoX `query_key_value`) need no special case: their
split/chunk/view moves the labels to the right heads.

Each labelled tensor must then hold every unit equally often, varying along one axis only, so
that the graph keeps working with fewer units; the shape constants along that axis (view,
reshape, expand sizes, split sizes) become `per_unit * kept_units`. A group that breaks these
rules is reported as a `Refusal` with the reason.

Imports only torch and the standard library, so the training program can vendor it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

aten = torch.ops.aten

#: Ops that only move data: evaluated on the label tensors themselves.
SHAPE_OPS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.slice.Tensor, aten.select.int,
    aten.narrow.default, aten.cat.default, aten.flatten.using_ints, aten.repeat_interleave.self_int,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default, operator.getitem,
})
#: Shape ops whose size arguments may count units (rewritten when units are removed).
RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default})
#: Elementwise ops that are not tagged pointwise: the output follows the input labels.
ELEMENTWISE_EXTRA = frozenset({aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
                               aten.dropout.default, aten.type_as.default, aten.lift_fresh_copy.default})
#: Ops that mix along one axis (their `dim` argument): units must not vary along it.
AXIS_MIXERS = frozenset({aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int})
#: Ops that read a tensor without producing one.
READERS = frozenset({aten.sym_size.int, aten.sym_numel.default, aten._assert_tensor_metadata.default})
SDPA = aten.scaled_dot_product_attention.default
MATMULS = frozenset({aten.matmul.default, aten.bmm.default})
TRANSPOSES = frozenset({aten.t.default, aten.permute.default, aten.transpose.int})


class StructureError(Exception):
    """The graph could not be analysed (it did not run on the example inputs)."""


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Projection:
    """A matrix multiply by a stored weight: `aten.linear` (weight [out, in]) or
    `aten.addmm` / `aten.mm` (GPT-2 Conv1D, weight [in, out])."""

    node: fx.Node
    weight: str  # dotted get_attr target
    bias: str | None
    out_axis: int  # axis of the weight tensor that indexes output features
    module_path: str

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    @property
    def input(self) -> fx.Node:
        return self.node.args[1 if self.node.target == aten.addmm.default else 0]  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Member:
    """The features of one projection that a group's units own.

    `side = "out"`: output features (weight rows of a Linear, bias entries); `side = "in"`:
    input features (weight columns). `index[u]` lists unit u's features in ascending order;
    in a fused projection a unit's q, k and v slices all appear, at their offsets in the
    fused weight (GPT-2: `h*d`, `H*d + h*d`, `2*H*d + h*d`; GPT-NeoX: `3*h*d` onwards).
    """

    projection: Projection
    side: Literal["out", "in"]
    index: torch.Tensor  # [units, features per unit], int64

    @property
    def weight_axis(self) -> int:
        return self.projection.out_axis if self.side == "out" else self.projection.in_axis


@dataclass(frozen=True)
class ShapeConstant:
    """An integer shape argument that counts units: it becomes `per_unit * kept_units`.

    `node.args[arg]` is the integer, or `node.args[arg][item]` when the argument is a list.
    """

    node: fx.Node
    arg: int
    item: int | None
    per_unit: int


@dataclass(frozen=True, eq=False)
class CoupledGroup:
    """Projections whose features must be removed together, unit by unit.

    `kind = "attention"`: a unit is a head, or with grouped-query attention a k/v head and
    its `heads // units` query heads; `heads` counts query heads, `head_dim` their size.
    `kind = "mlp"`: a unit is one intermediate channel.
    """

    kind: Literal["attention", "mlp"]
    root: str  # deepest module holding all member projections
    members: tuple[Member, ...]
    units: int
    shape_constants: tuple[ShapeConstant, ...]
    heads: int = 0
    head_dim: int = 0

    @property
    def module_paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.projection.module_path for m in self.members))


@dataclass(frozen=True)
class Refusal:
    """A group that cannot be shrunk, and why (for the plan's author)."""

    kind: Literal["attention", "mlp"]
    root: str
    module_paths: tuple[str, ...]
    reason: str


@dataclass
class Structure:
    groups: list[CoupledGroup] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


# ----------------------------------------------------------------------------- projections


def _weight_of(arg: object) -> tuple[str, bool] | None:
    """(get_attr target, stored transposed?) of a weight argument, or None."""
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        return str(arg.target), False
    if arg.target in TRANSPOSES and isinstance(arg.args[0], fx.Node) and arg.args[0].op == "get_attr":
        return str(arg.args[0].target), True
    return None


def _module_path(node: fx.Node, weight: str) -> str:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if stack:
        path, cls = stack[-1]
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        if name.endswith(("Linear", "Conv1D")):
            return str(path)
    return weight.rsplit(".", 1)[0]


def find_projections(gm: fx.GraphModule) -> list[Projection]:
    """Every multiply by a stored 2-D weight, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            weight, bias = _weight_of(node.args[1]), node.args[2] if len(node.args) > 2 else None
            out_axis = 0
        elif node.target == aten.addmm.default:
            weight, bias = _weight_of(node.args[2]), node.args[0]
            out_axis = 1
        elif node.target in (aten.mm.default, aten.matmul.default):
            weight, bias = _weight_of(node.args[1]), None
            out_axis = 1
        else:
            continue
        if weight is None or (bias is not None and _weight_of(bias) is None):
            continue
        name, transposed = weight
        bias_name = _weight_of(bias)[0] if bias is not None else None
        found.append(Projection(node, name, bias_name, 1 - out_axis if transposed else out_axis, _module_path(node, name)))
    return found


# ----------------------------------------------------------------------------- analysis


class _Unions:
    """Union-find over integer feature ids."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = self.parent.setdefault(a, a)
        while root != self.parent[root]:
            root = self.parent[root]
        while a != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union_all(self, ids: torch.Tensor) -> None:
        ids = ids[ids >= 0].unique().tolist()
        for other in ids[1:]:
            self.parent[self.find(other)] = self.find(ids[0])


class _Component:
    """Nodes connected by labelled data, with their sources, sinks and attention ops."""

    def __init__(self) -> None:
        self.nodes: list[fx.Node] = []
        self.sources: list[Projection] = []
        self.sinks: list[Projection] = []
        self.attention: list[fx.Node] = []
        self.reason: str | None = None
        #: (node, region labels, outside operand shape): outside tensors broadcast with labels.
        self.outside: list[tuple[fx.Node, torch.Tensor, tuple[int, ...]]] = []
        self.mixers: list[tuple[fx.Node, torch.Tensor, int]] = []

    def refuse(self, reason: str) -> None:
        self.reason = self.reason or reason


def _record_values(gm: fx.GraphModule, args: Sequence[Any]) -> dict[fx.Node, Any]:
    """Concrete shapes (tensors) and values (ints) of every node on the example inputs."""
    seen: dict[fx.Node, Any] = {}

    def summary(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(summary(v) for v in value)
        return torch.Size(value.shape) if isinstance(value, torch.Tensor) else value

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            seen[n] = summary(result)
            return result

    try:
        with torch.no_grad():
            Recorder(gm).run(*args)
    except Exception as error:  # noqa: BLE001 - any failure means the graph cannot be analysed
        raise StructureError(f"the graph did not run on the example inputs: {type(error).__name__}: {error}") from error
    return seen


def _describe(node: fx.Node) -> str:
    where = list((node.meta.get("nn_module_stack") or {}).values())
    module = f" in {where[-1][0]}" if where and where[-1][0] else ""
    return f"{node.name} ({getattr(node.target, '__name__', node.target)}){module}"


class _Refused(Exception):
    """Raised while labelling: the component cannot be shrunk, for the given reason."""


class _Labeller:
    """Pushes feature labels through the graph and couples them (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any]) -> None:
        self.gm, self.values = gm, values
        self.unions = _Unions()
        self.labels: dict[fx.Node, Any] = {}
        self.component: dict[fx.Node, _Component] = {}
        self.projections = {p.node: p for p in find_projections(gm)}
        #: Feature ids of each projection's outputs (sources) and inputs (sinks).
        self.out_ids: dict[fx.Node, torch.Tensor] = {}
        self.in_ids: dict[fx.Node, torch.Tensor] = {}
        self.next_id = 0

    def fresh(self, count: int) -> torch.Tensor:
        ids = torch.arange(self.next_id, self.next_id + count)
        self.next_id += count
        return ids

    def run(self) -> list[_Component]:
        for node in self.gm.graph.nodes:
            projection = self.projections.get(node)
            if projection is not None:
                if projection.input in self.labels:
                    self._sink(projection)
                component = _Component()
                component.sources.append(projection)
                shape = self.values[node]
                self.out_ids[node] = self.fresh(shape[-1])
                self._own(node, component, self.out_ids[node].expand(*shape).contiguous())
                continue
            labelled = [a for a in node.all_input_nodes if a in self.labels]
            if not labelled:
                continue
            component = self._merge([self.component[a] for a in labelled])
            if component.reason:
                continue
            try:
                self._step(node, component)
            except _Refused as refused:
                component.refuse(str(refused))
        return list({id(c): c for c in self.component.values()}.values())

    def _merge(self, parts: list[_Component]) -> _Component:
        first = parts[0]
        for other in dict.fromkeys(parts[1:]):
            if other is first:
                continue
            for node in other.nodes:
                self.component[node] = first
            for name in ("nodes", "sources", "sinks", "attention", "outside", "mixers"):
                getattr(first, name).extend(getattr(other, name))
            if other.reason:
                first.refuse(other.reason)
        return first

    def _own(self, node: fx.Node, component: _Component, labels: Any) -> None:
        self.labels[node] = labels
        self.component[node] = component
        component.nodes.append(node)

    def _sink(self, projection: Projection) -> None:
        """A projection reading labelled features: its input column c joins column c's labels."""
        x = self.labels[projection.input]
        columns = self.fresh(x.shape[-1])
        per_column = x.reshape(-1, x.shape[-1]).unique(dim=0).t()
        for column, labels in zip(columns.tolist(), per_column, strict=True):
            self.unions.union_all(torch.cat([torch.tensor([column]), labels]))
        self.in_ids[projection.node] = columns
        self.component[projection.input].sinks.append(projection)

    def _arg(self, value: Any) -> Any:
        """A node argument for re-running a shape op on labels: labels, or -1 for outside data."""
        if isinstance(value, fx.Node):
            if value in self.labels:
                return self.labels[value]
            recorded = self.values.get(value)
            return torch.full(recorded, -1) if isinstance(recorded, torch.Size) else recorded
        if isinstance(value, (list, tuple)):
            return type(value)(self._arg(v) for v in value)
        return value

    def _step(self, node: fx.Node, component: _Component) -> None:
        target = node.target
        if node.op != "call_function":
            where = "the graph output" if node.op == "output" else f"{node.op} '{node.target}'"
            raise _Refused(f"{node.all_input_nodes[0].name} reaches {where}, which planc cannot shrink")
        if target in READERS:
            return
        if target in SHAPE_OPS:
            args = [self._arg(a) for a in node.args]
            kwargs = {k: self._arg(v) for k, v in node.kwargs.items()}
            if target in (aten.view.default, aten._unsafe_view.default):
                target = aten.reshape.default  # labels made by broadcasting are not viewable
            self._own(node, component, target(*args, **kwargs))
        elif target == SDPA:
            self._attention(node, component)
        elif target in MATMULS and all(isinstance(a, fx.Node) and a in self.labels for a in node.args[:2]):
            self._matmul(node, component)
        elif (
            isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
        ) or target in ELEMENTWISE_EXTRA or target in AXIS_MIXERS:
            self._elementwise(node, component)
        else:
            raise _Refused(f"{_describe(node)} reads it, and planc cannot follow that op")

    def _elementwise(self, node: fx.Node, component: _Component) -> None:
        shape = self.values[node]
        if not isinstance(shape, torch.Size):
            raise _Refused(f"{_describe(node)} does not return one tensor")
        region = [self.labels[a].expand(shape) for a in node.args if isinstance(a, fx.Node) and a in self.labels]
        for labels in region[1:]:
            for pair in torch.stack([region[0].reshape(-1), labels.reshape(-1)], 1).unique(dim=0):
                self.unions.union_all(pair)
        for a in node.args:
            if isinstance(a, fx.Node) and a not in self.labels and isinstance(self.values.get(a), torch.Size):
                component.outside.append((node, region[0], tuple(self.values[a])))
        if node.target in AXIS_MIXERS:
            component.mixers.append((node, region[0], int(node.args[1])))
        self._own(node, component, region[0].contiguous())

    def _attention(self, node: fx.Node, component: _Component) -> None:
        """scaled_dot_product_attention: one class per head (per k/v head with fewer k/v heads)."""
        q, k, v = (self.labels.get(a) for a in node.args[:3])
        if q is None or k is None or v is None:
            raise _Refused(f"{_describe(node)}: q, k and v do not all come from projections")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and len(self.values[mask]) >= 3 and self.values[mask][-3] != 1:
            raise _Refused(f"{_describe(node)}: the attention mask has one entry per head (a bias such as ALiBi)")
        shape = self.values[node]
        heads, kv_heads = q.shape[-3], k.shape[-3]
        lead = shape[:-3]
        out = self.fresh(int(torch.Size(lead).numel()) * heads * shape[-1])
        out = out.reshape(*lead, heads, 1, shape[-1]).expand(shape)
        for h in range(heads):
            g = h * kv_heads // heads
            parts = (q.select(-3, h), k.select(-3, g), v.select(-3, g), out.select(-3, h))
            self.unions.union_all(torch.cat([p.flatten() for p in parts]))
        component.attention.append(node)
        self._own(node, component, out.contiguous())

    def _matmul(self, node: fx.Node, component: _Component) -> None:
        """matmul of two labelled tensors (q @ k^T, p @ v): one class per batch entry (head)."""
        a, b = (self.labels[x] for x in node.args[:2])
        shape = self.values[node]
        batch = shape[:-2]
        count = int(torch.Size(batch).numel())
        out = self.fresh(count * shape[-1]).reshape(*batch, 1, shape[-1]).expand(shape)
        flat = [t.expand(*batch, *t.shape[-2:]).reshape(count, -1) for t in (a, b, out)]
        for i in range(count):
            self.unions.union_all(torch.cat([t[i] for t in flat]))
        component.attention.append(node)
        self._own(node, component, out.contiguous())


# ----------------------------------------------------------------------------- groups


def find_structure(gm: fx.GraphModule, example_args: Sequence[Any]) -> Structure:
    """Coupled attention and MLP groups of `gm`, and the groups that cannot be shrunk.

    `example_args`: the graph's placeholder values (it runs once, to learn concrete shapes).
    """
    labeller = _Labeller(gm, _record_values(gm, example_args))
    components = [c for c in labeller.run() if c.sources and (c.sinks or c.attention)]
    roots = torch.tensor([labeller.unions.find(i) for i in range(labeller.next_id)], dtype=torch.long)
    structure = Structure()
    for component in components:
        kind: Literal["attention", "mlp"] = "attention" if component.attention else "mlp"
        paths = tuple(dict.fromkeys(p.module_path for p in component.sources + component.sinks))
        try:
            if component.reason:
                raise _Refused(component.reason)
            if not component.sinks:
                raise _Refused("the attention output is not read by a projection")
            structure.groups.append(_group(gm, kind, component, labeller, roots))
        except _Refused as refused:
            structure.refusals.append(Refusal(kind, _common_root(paths), paths, str(refused)))
    return structure


def _common_root(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)


def _group(
    gm: fx.GraphModule, kind: Literal["attention", "mlp"], component: _Component, labeller: _Labeller, roots: torch.Tensor
) -> CoupledGroup:
    """Units of one component, its members' index tables, and its shape constants."""
    unit_name = "head" if kind == "attention" else "channel"
    sides = [(p, "out", labeller.out_ids[p.node]) for p in component.sources]
    sides += [(p, "in", labeller.in_ids[p.node]) for p in component.sinks]
    order = torch.tensor(list(dict.fromkeys(roots[sides[0][2]].tolist())))  # units in the first source's order
    units = len(order)
    if units < 2:
        raise _Refused(f"all its features form one {unit_name}")
    sorted_roots, unit_of_sorted = order.sort()
    position = torch.searchsorted(sorted_roots, roots).clamp(max=units - 1)
    lookup = torch.where(sorted_roots[position] == roots, unit_of_sorted[position], -1)  # feature id -> unit
    members = []
    for projection, side, ids in sides:
        unit = lookup[ids]
        counts = torch.bincount(unit[unit >= 0], minlength=units)
        if (unit < 0).any() or (counts != counts[0]).any():
            raise _Refused(f"the {unit_name}s own unequal parts of {projection.module_path}")
        members.append(Member(projection, side, torch.argsort(unit, stable=True).reshape(units, -1)))  # type: ignore[arg-type]
    _check_weights_private(gm, members)
    constants = _shape_constants(component, labeller, lookup, units, unit_name)
    for node, labels, outside in component.outside:
        axis = _unit_axis(lookup[labels.clamp(min=0)])
        aligned = -1 if axis is None else axis - labels.dim() + len(outside)
        if aligned >= 0 and outside[aligned] > 1:
            raise _Refused(f"{_describe(node)} combines the {unit_name}s with a tensor holding one entry per {unit_name}")
    for node, labels, dim in component.mixers:
        if _unit_axis(lookup[labels.clamp(min=0)]) == dim % labels.dim():
            raise _Refused(f"{_describe(node)} mixes values across {unit_name}s")
    heads = head_dim = 0
    if kind == "attention":
        query = labeller.values[component.attention[0].args[0]]
        heads, head_dim = int(query[-3]), int(query[-1])
        if heads % units:
            raise _Refused(f"{heads} query heads do not split into {units} key/value groups")
    root = _common_root([m.projection.module_path for m in members])
    return CoupledGroup(kind, root, tuple(members), units, tuple(constants), heads, head_dim)


def _unit_axes(units: torch.Tensor) -> list[int]:
    """The axes along which `units` varies."""
    return [a for a in range(units.dim()) if units.shape[a] > 1 and bool((units != units.narrow(a, 0, 1)).any())]


def _unit_axis(units: torch.Tensor) -> int | None:
    return next(iter(_unit_axes(units)), None)


def _check_weights_private(gm: fx.GraphModule, members: list[Member]) -> None:
    """A weight read elsewhere (tied embeddings, a second call) cannot change shape."""
    own = {m.projection.node for m in members}
    for member in members:
        for name in (member.projection.weight, member.projection.bias if member.side == "out" else None):
            for getter in gm.graph.find_nodes(op="get_attr", target=name) if name else []:
                readers = {u for user in getter.users for u in ([user] if user in own else user.users)}
                if not readers <= own:
                    raise _Refused(f"{name} is also read outside this block (a tied or shared weight)")


def _shape_constants(
    component: _Component, labeller: _Labeller, lookup: torch.Tensor, units: int, unit_name: str
) -> list[ShapeConstant]:
    """Check that every labelled tensor holds all units evenly along one axis, and collect the
    integer shape arguments that count units."""
    axes: dict[fx.Node, int] = {}
    for node in component.nodes:
        labels = labeller.labels[node]
        if not isinstance(labels, torch.Tensor):
            continue  # split/chunk results: checked through their getitem nodes
        unit = torch.where(labels >= 0, lookup[labels.clamp(min=0)], -1)
        if (unit < 0).any():
            raise _Refused(f"{_describe(node)} mixes these features with other data")
        varying = _unit_axes(unit)
        if len(varying) > 1:
            raise _Refused(f"{_describe(node)} spreads the {unit_name}s over several axes")
        axis = varying[0] if varying else None
        sequence = unit.flatten() if axis is None else unit.movedim(axis, -1).reshape(-1, unit.shape[axis])[0]
        counts = torch.bincount(sequence, minlength=units)
        if axis is None or (counts != counts[0]).any():
            hint = " (as a rotary embedding applied before the split into heads does)" if node.target == aten.slice.Tensor else ""
            raise _Refused(f"{_describe(node)} takes only part of the {unit_name}s{hint}")
        axes[node] = axis
    constants: list[ShapeConstant] = []
    for node in component.nodes:
        for arg, item in _unit_arguments(node, axes, labeller.values):
            value = node.args[arg] if item is None else node.args[arg][item]
            if value == -1 and node.target in RESHAPES:
                continue
            if not isinstance(value, int):
                raise _Refused(f"{_describe(node)} computes the {unit_name}s' size at run time")
            if value % units:
                raise _Refused(f"{_describe(node)}: size {value} is not a multiple of {units} {unit_name}s")
            constants.append(ShapeConstant(node, arg, item, value // units))
    return constants


def _unit_arguments(node: fx.Node, axes: dict[fx.Node, int], values: dict[fx.Node, Any]) -> list[tuple[int, int | None]]:
    """(argument, list item) positions of `node` that size its input's or output's unit axis."""
    if node.target in RESHAPES and node in axes:
        return [(1, axes[node])]
    source = node.args[0] if node.args else None
    if source not in axes:
        return []
    if node.target in (aten.split.Tensor, aten.split_with_sizes.default):
        dim = node.args[2] if len(node.args) > 2 else 0
    elif node.target in (aten.slice.Tensor, aten.narrow.default):
        dim = node.args[1] if len(node.args) > 1 else 0
    else:
        return []
    size = values[source]
    if int(dim) % len(size) != axes[source]:
        return []
    if node.target == aten.split.Tensor:
        return [(1, None)]
    if node.target == aten.split_with_sizes.default:
        return [(1, i) for i in range(len(node.args[1]))]
    limit = size[axes[source]]  # slice start/end, narrow start/length inside the axis
    return [(i, None) for i in (2, 3) if len(node.args) > i and isinstance(node.args[i], int) and 0 < node.args[i] <= limit]
