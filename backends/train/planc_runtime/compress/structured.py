"""Structured compression: remove whole attention heads, MLP channels or blocks.

The student gets smaller for real (sliced Linears, a shorter block list); Shrink records every
cut, so dense_state_dict can lay the trained weights out at the original model's size again.
Importance is a weight norm or, with importance = activation, the output energy measured on
calibration text (calibration.py), which `reconstruct` also uses to refit what remains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import _module, _replace
from .calibration import input_gram, output_energy, refit_columns


def _has(module: nn.Module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
    except AttributeError:
        return False
    return True


def _owners(model: nn.Module, paths: Sequence[str], children: tuple[str, ...]) -> list[str]:
    """Paths of the modules that own all of `children` (dotted paths below them), found from the
    paths a selector matched (anything at or above one of the children: the child, a module
    between it and the owner, the owner, an ancestor), in model order."""
    owners = []
    for name, module in model.named_modules():
        if all(_has(module, c) for c in children):
            own = [f"{name}.{c}" if name else c for c in children]
            if any(_within(c, p) for c in own for p in paths):
                owners.append(name)
    return owners


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _importance(parts: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Per-group importance: l1 or l2 norm over all weights of each group (rows of `parts`)."""
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1).float()
    return flat.abs().sum(1) if norm == "l1" else flat.pow(2).sum(1).sqrt()


def _keep_count(total: int, sparsity: float) -> int:
    return max(1, total - int(round(sparsity * total)))


@dataclass
class Shrink:
    """Record of structural edits, so the saved weights can be laid out at the original size."""

    #: Linear weight path -> (dim shrunk, original size, kept indices).
    cuts: dict[str, tuple[int, int, list[int]]] = field(default_factory=dict)
    #: Block list path -> original indices of the blocks kept, in order.
    blocks: dict[str, list[int]] = field(default_factory=dict)
    #: Weights of removed blocks (original values, CPU): saved back in their place.
    removed: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def _slice_linear(linear: nn.Linear, dim: int, keep: torch.Tensor) -> nn.Linear:
    """A smaller copy of `linear` keeping output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.index_select(dim, keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(weight)
    if linear.bias is not None:
        new.bias.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, keep))
    return new


#: (q, k, v, out) projections of an attention module: the example GPT's and Hugging Face BERT's.
ATTENTION_LAYOUTS = (
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("self.query", "self.key", "self.value", "output.dense"),
)
#: (up-projection, down-projection) of an MLP: the example GPT's and a BERT layer's.
MLP_LAYOUTS = (("fc_in", "fc_out"), ("intermediate.dense", "output.dense"))
#: Attributes naming the head size on attention modules.
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")


def _head_dim(attn: nn.Module, name: str) -> int:
    for module in attn.modules():
        for attr in HEAD_DIM_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError(f"{name} has no head_dim / attention_head_size attribute: cannot tell its heads apart")


def shrink_attention_heads(
    model: nn.Module, paths: Sequence[str], record: Shrink, sparsity: float, importance: str = "l2",
    reconstruct: bool = False, calibration: Sequence[dict[str, torch.Tensor]] = (),
) -> int:
    """Remove the least important `sparsity` fraction of heads of each selected attention.

    An attention is selected by its own path, an ancestor, or any of its q/k/v/out projections
    (GPT layout q_proj/k_proj/v_proj/out_proj, or BERT's self.query/key/value + output.dense).
    Head h owns rows h*d..(h+1)*d of q/k/v and the same columns of the out projection;
    importance is the l1/l2 norm of all of them, or (`activation`) the energy of the head's
    output on the `calibration` batches; `reconstruct` refits the out projection to the kept
    heads (see refit_columns). Both forwards infer the head count from the shapes, so slicing
    the projections is enough. Returns how many heads were removed.
    """
    removed, found = 0, False
    for layout in ATTENTION_LAYOUTS:
        for name in _owners(model, paths, layout):
            found = True
            removed += _shrink_heads(model, name, layout, record, sparsity, importance, reconstruct, calibration)
    if not found:
        raise ValueError(
            "prune method=heads found no attention (q_proj/k_proj/v_proj/out_proj or BERT self.query/key/value + "
            f"output.dense) among the selected modules {list(paths)[:4]}"
        )
    return removed


def _shrink_heads(model: nn.Module, name: str, layout: tuple[str, ...], record: Shrink, sparsity: float,
                  importance: str, reconstruct: bool, calibration: Sequence[dict[str, torch.Tensor]]) -> int:
    attn = _module(model, name)
    head_dim = _head_dim(attn, name)
    q, k, v, out = (attn.get_submodule(p) for p in layout)
    heads = q.out_features // head_dim
    gram = input_gram(model, out, calibration) if importance == "activation" or reconstruct else None
    if importance == "activation":
        scores = output_energy(out.weight, gram, torch.arange(heads * head_dim).view(heads, head_dim))
    else:
        parts = [lin.weight.view(heads, head_dim, -1) for lin in (q, k, v)]
        parts.append(out.weight.view(out.out_features, heads, head_dim).transpose(0, 1))
        scores = _importance(parts, importance)
    kept_heads = scores.topk(_keep_count(heads, sparsity)).indices.sort().values.cpu()
    rows = (kept_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    prefix = f"{name}." if name else ""
    for proj in layout[:3]:
        record.cuts[prefix + proj] = (0, heads * head_dim, rows.tolist())
        _replace(attn, proj, _slice_linear(attn.get_submodule(proj), 0, rows.to(q.weight.device)))
    record.cuts[prefix + layout[3]] = (1, heads * head_dim, rows.tolist())
    if reconstruct:
        _replace(attn, layout[3], refit_columns(out, gram, rows))
    else:
        _replace(attn, layout[3], _slice_linear(out, 1, rows.to(out.weight.device)))
    for module in attn.modules():  # keep BERT's bookkeeping attributes truthful
        if hasattr(module, "num_attention_heads") and hasattr(module, "all_head_size"):
            module.num_attention_heads, module.all_head_size = len(kept_heads), len(kept_heads) * head_dim
    return heads - len(kept_heads)


def shrink_mlp_channels(
    model: nn.Module, paths: Sequence[str], record: Shrink, sparsity: float, importance: str = "l2",
    reconstruct: bool = False, calibration: Sequence[dict[str, torch.Tensor]] = (),
) -> int:
    """Remove the least important `sparsity` fraction of hidden channels of each selected MLP.

    Channel c is row c of the up-projection (fc_in, or BERT's intermediate.dense) with its bias
    and column c of the down-projection (fc_out, or BERT's output.dense). Importance and
    `reconstruct` work as in shrink_attention_heads. Returns channels removed.
    """
    removed, found = 0, False
    for up_name, down_name in MLP_LAYOUTS:
        for name in _owners(model, paths, (up_name, down_name)):
            found = True
            mlp = _module(model, name)
            up, down = mlp.get_submodule(up_name), mlp.get_submodule(down_name)
            width = up.out_features
            gram = input_gram(model, down, calibration) if importance == "activation" or reconstruct else None
            if importance == "activation":
                scores = output_energy(down.weight, gram, torch.arange(width).view(width, 1))
            else:
                scores = _importance([up.weight, down.weight.t()], importance)
            keep = scores.topk(_keep_count(width, sparsity)).indices.sort().values.cpu()
            prefix = f"{name}." if name else ""
            record.cuts[prefix + up_name] = (0, width, keep.tolist())
            record.cuts[prefix + down_name] = (1, width, keep.tolist())
            _replace(mlp, up_name, _slice_linear(up, 0, keep.to(up.weight.device)))
            if reconstruct:
                _replace(mlp, down_name, refit_columns(down, gram, keep))
            else:
                _replace(mlp, down_name, _slice_linear(down, 1, keep.to(down.weight.device)))
            removed += width - len(keep)
    if not found:
        raise ValueError(
            "prune method=channels found no MLP (fc_in/fc_out or BERT intermediate.dense/output.dense) among the "
            f"selected modules {list(paths)[:4]}"
        )
    return removed


def _block_list_of(model: nn.Module, paths: Sequence[str]) -> tuple[str, nn.ModuleList, list[int]]:
    """The block list (a ModuleList) holding the selected modules, and its selected indices."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and name:
            selected = [i for i in range(len(module))
                        if any(_within(p, f"{name}.{i}") or _within(f"{name}.{i}", p) for p in paths)]
            if selected:
                found.append((name, module, selected))
    if len(found) != 1:
        raise ValueError(
            f"prune method=layers needs the selection inside one list of blocks; found {[f[0] for f in found]}"
        )
    return found[0]


@torch.no_grad()
def drop_blocks(model: nn.Module, paths: Sequence[str], record: Shrink, keep: Sequence[int]) -> int:
    """Remove the selected blocks not in `keep` (original indices) from the model's block list.

    The list is replaced by the kept blocks, in order: the model runs them back to back, so
    block i-1's output feeds block i+1. Run this after every edit that names modules by path
    (their paths use the original numbering); the removed blocks' weights are remembered so the
    saved state has every original key. Returns how many blocks were removed.
    """
    name, blocks, selected = _block_list_of(model, paths)
    if any(i >= len(blocks) for i in keep):
        raise ValueError(f"keep = {list(keep)} names blocks past the {len(blocks)} of {name}")
    kept = [i for i in range(len(blocks)) if i in keep or i not in selected]
    for i in range(len(blocks)):
        if i not in kept:
            for key, value in blocks[i].state_dict().items():
                record.removed[f"{name}.{i}.{key}"] = value.detach().cpu().clone()
    record.blocks[name] = kept
    _replace(model, name, nn.ModuleList([blocks[i] for i in kept]))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
    return len(blocks) - len(kept)


@torch.no_grad()
def dense_state_dict(state: dict[str, torch.Tensor], shrink: Shrink) -> dict[str, torch.Tensor]:
    """The trained weights laid out like the original model, so its factory can load them.

    Low-rank pairs are multiplied back into one weight; removed heads/channels come back as
    zero rows/columns (the function is unchanged: a zeroed head or channel contributes nothing),
    and a later structured prune finds them first. Kept blocks get their original indices back
    and removed blocks their weights from before training, so the original model loads the
    state and `prune { method = layers, keep = ... }` removes the same blocks again.
    """
    state = _renumber_blocks(state, shrink)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".down.weight"):
            prefix = key[: -len(".down.weight")]
            out[f"{prefix}.weight"] = state[f"{prefix}.up.weight"].float() @ value.float()
            continue
        if key.endswith(".up.weight"):
            continue
        if key.endswith(".up.bias"):
            out[key[: -len(".up.bias")] + ".bias"] = value
            continue
        out[key] = value
    for path, (dim, size, kept) in shrink.cuts.items():
        index = torch.tensor(kept)
        weight = out[f"{path}.weight"]
        shape = list(weight.shape)
        shape[dim] = size
        out[f"{path}.weight"] = weight.new_zeros(shape).index_copy_(dim, index, weight)
        if dim == 0 and f"{path}.bias" in out:
            bias = out[f"{path}.bias"]
            out[f"{path}.bias"] = bias.new_zeros(size).index_copy_(0, index, bias)
    return out


def _renumber_blocks(state: dict[str, torch.Tensor], shrink: Shrink) -> dict[str, torch.Tensor]:
    """Student keys `list.k.*` -> `list.<k-th kept index>.*`, plus the removed blocks' weights."""
    if not shrink.blocks:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for name, kept in shrink.blocks.items():
            head = name + "."
            if key.startswith(head):
                index, _, rest = key[len(head):].partition(".")
                if index.isdigit():
                    key = f"{head}{kept[int(index)]}.{rest}"
                break
        out[key] = value
    out.update(shrink.removed)
    return out
