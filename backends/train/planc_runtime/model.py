"""The model: rebuild the plan's model, find its blocks, read its outputs, edit it in place.

load_model                       the plan's model, rebuilt by model_source.py (the compiler's own copy)
find_blocks                      the list of repeated transformer blocks
logits_of, sentence_embedding    what a plain or Hugging Face output holds
set_dropout, freeze              training-time settings of the student
_module, _replace                submodule by dotted path, and swapping one in
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import model_source


def load_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the plan's model from its spec, exactly as the compiler does (`model_source.py`)."""
    return model_source.load(spec)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of repeated transformer blocks (the longest ModuleList)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks (nn.ModuleList) to train per block")
    return best


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a plain model (a tensor) or a Hugging Face output (`.logits`)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def sentence_embedding(output: Any) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden state of an encoder (no padding in packed data)."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return F.normalize(hidden.float().mean(dim=1), dim=-1)


def set_dropout(model: nn.Module, probability: float) -> None:
    """Set every dropout of the model: its nn.Dropout modules, and the `attention_dropout`
    probability some Hugging Face attentions (e.g. Llama's) read at call time instead."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = probability


def freeze(model: nn.Module, patterns: Sequence[str]) -> int:
    """Stop training the parameters whose module path matches one of the globs; returns how many."""
    from fnmatch import fnmatchcase

    count = 0
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if any(fnmatchcase(owner, p) or fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
            count += param.numel()
    return count


def _module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(_module(model, parent), child, new)
