"""Structured compression: the record of what was removed, and removing whole blocks.

The student gets smaller for real (sliced projections in units.py, a shorter block list here);
Shrink records every cut, so dense_state_dict can lay the trained weights out at the original
model's size again, with the removed heads, channels and blocks where they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..model import _replace


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


class Cut(NamedTuple):
    """Axis `dim` of `<path>.weight` keeps entries `kept` of its original `size`; `bias`: the
    bias lost the same entries (the projection's outputs were cut)."""

    dim: int
    size: int
    kept: list[int]
    bias: bool


@dataclass
class Shrink:
    """Record of structural edits, so the saved weights can be laid out at the original size."""

    #: Projection (module) path -> its cut, in the original model's numbering.
    cuts: dict[str, Cut] = field(default_factory=dict)
    #: Block list path -> original indices of the blocks kept, in order.
    blocks: dict[str, list[int]] = field(default_factory=dict)
    #: Weights of removed blocks (original values, CPU): saved back in their place.
    removed: dict[str, torch.Tensor] = field(default_factory=dict)

    def cut(self, path: str, dim: int, size: int, kept: list[int], bias: bool) -> None:
        """Record a cut; a second cut of the same axis (a second prune step) keeps indices of
        the already shrunk weight, so it is composed with the first."""
        earlier = self.cuts.get(path)
        if earlier is not None:
            if earlier.dim != dim:
                raise ValueError(f"{path} was already shrunk along axis {earlier.dim}; planc cannot also shrink "
                                 f"axis {dim} and still save it at its original size")
            kept, size = [earlier.kept[i] for i in kept], earlier.size
        self.cuts[path] = Cut(dim, size, kept, bias)


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
    for path, (dim, size, kept, cut_bias) in shrink.cuts.items():
        weight = out[f"{path}.weight"]
        index = torch.tensor(kept, device=weight.device)
        shape = list(weight.shape)
        shape[dim] = size
        out[f"{path}.weight"] = weight.new_zeros(shape).index_copy_(dim, index, weight)
        if cut_bias and f"{path}.bias" in out:
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
