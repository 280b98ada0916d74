"""What every part of the model source shares: the error type, tasks, input dtypes, outputs."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

logger = logging.getLogger("planc.compiler.model")

Task = Literal["encoder", "causal_lm"]

#: Inputs a tokenizer can derive from text. Anything else cannot be fed from a text file.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

DTYPES = {
    "int64": torch.int64,
    "int32": torch.int32,
    "float32": torch.float32,
    "float16": torch.float16,
    "bool": torch.bool,
}


class FrontendError(Exception):
    """The model named by a plan cannot be loaded, tokenized or captured; the message says why."""


def primary_output(outputs: Any) -> torch.Tensor:
    """The main tensor of a model's outputs: logits, else last hidden state, else the first tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        for key in ("logits", "last_hidden_state"):
            value = outputs.get(key) if hasattr(outputs, "get") else None
            if isinstance(value, torch.Tensor):
                return value
        values = list(outputs.values())
    elif isinstance(outputs, (tuple, list)):
        values = list(outputs)
    else:
        raise FrontendError(f"model output of type {type(outputs).__name__} holds no tensor")
    for value in values:
        try:
            return primary_output(value)
        except FrontendError:
            continue
    raise FrontendError(f"model output of type {type(outputs).__name__} holds no tensor")
