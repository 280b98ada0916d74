"""Remove whole attention heads and MLP channels from the eager student, before training.

The coupled groups come from the same analysis the compile-time pass uses (`structure.py`, a
copy of planc's passes/structure.py): the model is captured with torch.export on an example
batch, and the graph's data flow says which rows and columns of which projections form each
head (or grouped-query k/v group) and each MLP channel, fused q/k/v weights (GPT-2 `c_attn`,
GPT-NeoX `query_key_value`) and gated MLPs included. The eager modules' weights are then sliced
unit by unit, and the attention modules' head-count attributes updated, so the eager forward
runs with fewer heads. Units are ranked like the compile-time pass ranks them (l1/l2 norm of
all their weights), or by the energy they add to the block's output on calibration text
(importance = activation); `reconstruct` refits the projection reading them by least squares.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import fx, nn

from ..structure import CoupledGroup, Member, StructureError, find_structure
from .calibration import input_gram, output_energy, refit_weight
from .structured import Shrink

#: Attributes of attention modules that count query heads, and k/v heads, and the width of the
#: heads' outputs: set to the kept count where they held the old one (forwards that reshape
#: with -1 do not need them; GPT-2 splits its fused q/k/v by `split_size`).
HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
KV_HEAD_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
HEAD_WIDTHS = ("all_head_size", "split_size")

Batch = dict[str, torch.Tensor]


def shrink_attention_heads(
    model: nn.Module, paths: Sequence[str], record: Shrink, sparsity: float, importance: str = "l2",
    reconstruct: bool = False, calibration: Sequence[Batch] = (), example: Batch | None = None,
) -> int:
    """Remove the least important `sparsity` fraction of heads of each selected attention.

    An attention is selected by its root module, an ancestor, or one of its projections (as the
    compile-time pass selects). With grouped-query attention the unit is a k/v head with its
    query heads. `example`: a batch of the model's inputs to trace it on (default: the first
    calibration batch, else a small synthetic one). Returns how many query heads were removed.
    """
    return _shrink(model, "attention", paths, record, sparsity, importance, reconstruct, calibration, example)


def shrink_mlp_channels(
    model: nn.Module, paths: Sequence[str], record: Shrink, sparsity: float, importance: str = "l2",
    reconstruct: bool = False, calibration: Sequence[Batch] = (), example: Batch | None = None,
) -> int:
    """Remove the least important `sparsity` fraction of hidden channels of each selected MLP:
    rows of its up (and gate) projections, columns of its down projection. Options as in
    shrink_attention_heads. Returns channels removed."""
    return _shrink(model, "mlp", paths, record, sparsity, importance, reconstruct, calibration, example)


def _shrink(
    model: nn.Module, kind: Literal["attention", "mlp"], paths: Sequence[str], record: Shrink, sparsity: float,
    importance: str, reconstruct: bool, calibration: Sequence[Batch], example: Batch | None,
) -> int:
    method, what = ("heads", "attention") if kind == "attention" else ("channels", "MLP")
    inputs = model_inputs(model, example if example is not None else calibration[0] if calibration else None)
    groups = selected_groups(model, kind, paths, inputs, f"prune method={method}")
    if not groups:
        raise ValueError(f"prune method={method} found no {what} with Linear layers among the selected modules "
                         f"{list(paths)[:4]}")
    removed = sum(_shrink_group(model, g, record, sparsity, importance, reconstruct, calibration) for g in groups)
    _check_runs(model, inputs, method)
    return removed


# ----------------------------------------------------------------------------- finding the groups


def selected_groups(
    model: nn.Module, kind: str, paths: Sequence[str], inputs: Batch, what: str
) -> list[CoupledGroup]:
    """The model's groups of `kind` that `paths` select; a refused one is an error naming why.

    `what` names the plan's request in the messages ("prune method=heads", "regularize group=heads").
    """
    try:
        with _capturing(model):
            graph = torch.export.export(model, (), kwargs=inputs, strict=False).module()
    except Exception as error:  # noqa: BLE001 - any capture failure: say so in the plan's terms
        raise ValueError(f"{what} traces the model with torch.export to find its units, and "
                         f"that failed: {type(error).__name__}: {_first_line(error)}") from error
    try:
        structure = find_structure(graph, _placeholder_values(graph, inputs))
    except StructureError as error:
        raise ValueError(f"{what}: {error}") from error
    groups = [g for g in structure.groups if g.kind == kind and len(g.module_paths) > 1
              and _selected(g.root, g.module_paths, paths)]
    refused = [r for r in structure.refusals if r.kind == kind and len(r.module_paths) > 1
               and _selected(r.root, r.module_paths, paths)]
    if refused and (kind == "attention" or not groups):
        first = refused[0]
        raise ValueError(f"{what} cannot shrink {first.root or 'the model'}: {first.reason}")
    return groups


@contextlib.contextmanager
def _capturing(model: nn.Module) -> Iterator[None]:
    """Eval mode and no key/value cache while tracing: the graph must end in the model's output
    alone (a returned cache would hold the heads)."""
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    training = model.training
    model.eval()
    if cache:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(training)
        if cache:
            config.use_cache = cache


def _placeholder_values(graph: fx.GraphModule, inputs: Batch) -> list[torch.Tensor]:
    spec = graph.graph._codegen.pytree_info.in_spec  # type: ignore[attr-defined]
    return list(fx._pytree.tree_flatten_spec(((), dict(inputs)), spec))


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _selected(root: str, module_paths: Sequence[str], paths: Sequence[str]) -> bool:
    return any(t == root or any(_within(p, t) for p in module_paths) for t in paths)


def model_inputs(model: nn.Module, batch: Batch | None) -> Batch:
    """The keyword inputs to trace `model` with, on its device: a few rows of `batch`, or two
    rows of seeded random token ids, the second padded (never all-ones: padding must show)."""
    device = next(model.parameters()).device
    if batch is not None:
        names = ("input_ids", "attention_mask") if "attention_mask" in batch else ("input_ids",)
        return {name: batch[name][:4].to(device) for name in names}
    vocab = _vocab_size(model)
    ids = torch.randint(min(vocab - 1, 5), vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    if "attention_mask" in inspect.signature(model.forward).parameters:
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    return {"input_ids": ids.to(device)}


def _vocab_size(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        embeddings = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embeddings is None:
        raise ValueError("structured pruning needs an example batch for a model without a token embedding")
    return embeddings.num_embeddings


@torch.no_grad()
def _check_runs(model: nn.Module, inputs: Batch, method: str) -> None:
    """The shrunk eager model still runs: its forward found the heads' new sizes."""
    training = model.training
    model.eval()
    try:
        model(**inputs)
    except Exception as error:  # noqa: BLE001 - report it as a limit of this model, not a crash
        raise ValueError(f"prune method={method}: after shrinking, the eager model no longer runs "
                         f"({type(error).__name__}: {_first_line(error)}); its forward keeps a size that planc "
                         "does not know how to update") from error
    finally:
        model.train(training)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


# ----------------------------------------------------------------------------- shrinking one group


def _parameter(model: nn.Module, name: str) -> tuple[nn.Module, str, torch.Tensor]:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return module, attr, getattr(module, attr)


def _out_in(weight: torch.Tensor, member: Member) -> torch.Tensor:
    """The member's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return weight if member.projection.out_axis == 0 else weight.t()


def _scores(model: nn.Module, group: CoupledGroup, importance: str, grams: dict[int, torch.Tensor]) -> torch.Tensor:
    """Per unit: the l1/l2 norm of all its weights, or the energy it adds to the output."""
    if importance == "activation":
        sinks = [m for m in group.members if m.side == "in"]
        energies = [output_energy(_out_in(_parameter(model, m.projection.weight)[2], m), grams[id(m)], m.index)
                    for m in sinks]
        return torch.stack(energies).sum(0).cpu()
    total = torch.zeros(group.units, dtype=torch.float64)
    for member in group.members:
        weight = _parameter(model, member.projection.weight)[2].detach()
        units = weight.movedim(member.weight_axis, 0)[member.index.to(weight.device)].flatten(1).double().cpu()
        total += units.abs().sum(1) if importance == "l1" else units.pow(2).sum(1)
    return total if importance == "l1" else total.sqrt()


@torch.no_grad()
def _shrink_group(
    model: nn.Module, group: CoupledGroup, record: Shrink, sparsity: float, importance: str, reconstruct: bool,
    calibration: Sequence[Batch],
) -> int:
    """Keep the group's most important units; returns how many query heads / channels went."""
    grams: dict[int, torch.Tensor] = {}  # by id of the member reading the units
    if importance == "activation" or reconstruct:
        for member in (m for m in group.members if m.side == "in"):
            grams[id(member)] = input_gram(model, _parameter(model, member.projection.weight)[0], calibration)
    drop = min(round(sparsity * group.units), group.units - 1)
    keep = _scores(model, group, importance, grams).topk(group.units - drop).indices.sort().values
    for member in group.members:
        _slice(model, member, keep, record, grams.get(id(member)) if reconstruct else None)
    if group.kind == "attention":
        _update_head_counts(model, group, len(keep))
        return drop * (group.heads // group.units)
    return drop


def _slice(model: nn.Module, member: Member, keep: torch.Tensor, record: Shrink, gram: torch.Tensor | None) -> None:
    """Keep the features of units `keep` in the member's weight (and bias, for outputs); a
    refit (`gram`) recomputes the kept input columns and the bias instead."""
    projection = member.projection
    module, attr, weight = _parameter(model, projection.weight)
    axis = member.weight_axis
    features = member.index[keep].flatten().sort().values
    index = features.to(weight.device)
    bias = _parameter(model, projection.bias)[2] if projection.bias else None
    if gram is not None:
        refit, new_bias = refit_weight(_out_in(weight, member), bias, gram, index)
        new_weight = refit if projection.out_axis == 0 else refit.t().contiguous()
    else:
        new_weight = weight.index_select(axis, index).clone()
        new_bias = bias.index_select(0, index).clone() if bias is not None and member.side == "out" else None
    _set(module, attr, weight, new_weight)
    if new_bias is not None:
        bias_module, bias_attr, _ = _parameter(model, str(projection.bias))
        _set(bias_module, bias_attr, bias, new_bias)
    path = projection.weight.rpartition(".")[0]
    record.cut(path, axis, weight.shape[axis], features.tolist(), bias=member.side == "out" and bias is not None)
    out_axis = projection.out_axis
    sizes = {"out_features": new_weight.shape[out_axis], "in_features": new_weight.shape[1 - out_axis]}
    sizes.update(nf=sizes["out_features"], nx=sizes["in_features"])  # Conv1D's names (its forward reads nf)
    for name, size in sizes.items():
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, size)


def _set(module: nn.Module, attr: str, old: torch.Tensor, value: torch.Tensor) -> None:
    setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def _update_head_counts(model: nn.Module, group: CoupledGroup, kept: int) -> None:
    """Set the attention modules' head counts and widths (see HEAD_COUNTS) to the kept ones."""
    per_unit = group.heads // group.units
    old: dict[str, int] = {"heads": group.heads, "kv": group.units, "width": group.heads * group.head_dim}
    new: dict[str, int] = {"heads": kept * per_unit, "kv": kept, "width": kept * per_unit * group.head_dim}
    projections = {m.projection.weight.rpartition(".")[0] for m in group.members}
    root = model.get_submodule(group.root) if group.root else model
    for name, module in root.named_modules(prefix=group.root):
        if name in projections:
            continue
        for what, attrs in (("heads", HEAD_COUNTS), ("kv", KV_HEAD_COUNTS), ("width", HEAD_WIDTHS)):
            for attr in attrs:
                if getattr(module, attr, None) == old[what]:  # counts are >= 2: never a bool
                    setattr(module, attr, new[what])
