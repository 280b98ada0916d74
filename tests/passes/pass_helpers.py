"""Helpers for the pass tests: load the example GPT and MiniLM and capture them as the driver does."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from planc.passes.base import PassContext
from shared_models import example_gpt_module as load_gpt_module  # noqa: F401  (the pass tests' name)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quarterly revenue rose by eight percent, beating analyst expectations.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She played the cello at the wedding, and everyone cried.",
    "Heavy rain is expected across the northern coast tomorrow afternoon.",
    "The patient was prescribed antibiotics for a mild bacterial infection.",
    "Compilers translate high-level source code into machine instructions.",
    "Our team won the championship after a dramatic overtime goal!",
    "Please remember to water the tomatoes while I am away.",
]


def gpt_inputs(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Byte-level ids of real text, left-padded like the decoding target does."""
    texts = ["Hello there, general Kenobi! ", "the cat sat on the mat and purred softly "] * batch
    rows, masks = [], []
    for i in range(batch):
        data = list(texts[i].encode())[: seq - (3 if i % 2 else 0)]
        pad = seq - len(data)
        rows.append([0] * pad + data)
        masks.append([0] * pad + [1] * len(data))
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}


def capture(model: torch.nn.Module, inputs: dict[str, torch.Tensor], max_seq: int = 256) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", max=64)
    seq = torch.export.Dim("seq", max=max_seq)
    dynamic = {name: {0: batch, 1: seq} for name in inputs}
    return torch.export.export(model, (), kwargs=inputs, dynamic_shapes=dynamic, strict=False).module()


def make_ctx(model, inputs, targets, source="test.plan:1:1", **kw) -> PassContext:
    return PassContext(model=model, example_inputs=inputs, targets=frozenset(targets), source=source, **kw)


def modules_of_type(model: torch.nn.Module, type_name: str) -> set[str]:
    return {name for name, m in model.named_modules() if type(m).__name__ == type_name}


def sentence_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def last_hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, dict):
        return output["last_hidden_state"]
    return output[0]
