"""The model: rebuild the plan's model, find its blocks, read its outputs, edit it in place.

load_model, hf_directory         a factory function (file or module) or a Hugging Face directory
find_blocks                      the list of repeated transformer blocks
logits_of, sentence_embedding    what a plain or Hugging Face output holds
set_dropout, freeze              training-time settings of the student
_module, _replace                submodule by dotted path, and swapping one in
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def load_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the plan's model: a factory function (file or module) or a Hugging Face directory."""
    if spec["kind"] == "factory":
        module = None
        if spec.get("module"):
            try:
                module = importlib.import_module(spec["module"])
            except ModuleNotFoundError:
                if not spec.get("file"):
                    raise
        if module is None:
            module = _import_file(Path(spec["file"]))
        factory = getattr(module, spec["function"], None)
        if factory is None:
            raise AttributeError(f"{spec['function']!r} not found in model factory {module.__name__}")
        return factory(**spec.get("args", {}))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    directory = hf_directory(spec)
    auto = transformers.AutoModelForCausalLM if spec.get("task") == "causal_lm" else transformers.AutoModel
    return auto.from_pretrained(directory, **spec.get("args", {}))


def _import_file(path: Path) -> Any:
    """Import a Python file by path (the model factory named in the plan)."""
    if not path.is_file():
        raise FileNotFoundError(f"model factory file {path} does not exist")
    name = f"planc_model_{path.stem}"
    if name not in sys.modules:
        loader = importlib.util.spec_from_file_location(name, path)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        loader.loader.exec_module(module)
    return sys.modules[name]


def hf_directory(spec: dict[str, Any]) -> Path:
    """The model's local directory, found inside its Python package when one is named.

    A package may keep its model in a subfolder: the shallowest folder holding a config.json
    (at or below the named directory) is the model's.
    """
    if spec.get("package"):
        found = importlib.util.find_spec(spec["package"])
        if found is None or found.origin is None:
            raise ModuleNotFoundError(f"model package {spec['package']!r} is not installed")
        root = Path(found.origin).parent / spec["ref"]
    else:
        root = Path(spec["ref"])
    if (root / "config.json").is_file() or not root.is_dir():
        return root
    configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    return configs[0].parent if configs else root


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
