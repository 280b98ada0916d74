"""Decoders as planc exports them: a forward that takes and returns the key/value cache as flat tensors.

`adapt` wraps the example GPT or a Hugging Face causal LM in a `CacheAdapter` whose
`forward(input_ids, attention_mask, position_ids, past) -> (logits, *presents)` the exporter
traces, and says how many key/value heads each layer caches (Falcon's multi-query attention
has one; grouped-query configs name theirs). A model it cannot drive is `UnsupportedDecoder`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional: the example GPT needs none of it
        return False
    return isinstance(model, PreTrainedModel)


class CacheAdapter(nn.Module):
    """`forward(input_ids, attention_mask, position_ids, past) -> (logits, *presents)`.

    `past` is a list of (key, value) per layer; presents are flat: key0, value0, key1, ...
    """

    family: str

    def cache_layout(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of each layer."""
        raise NotImplementedError

    def vocab_size(self) -> int:
        raise NotImplementedError

    def max_positions(self) -> int | None:
        raise NotImplementedError

    def attention_window(self) -> bool:
        """Whether some attention sees only a window of the past (sliding or chunked): then its
        mask is more than causal + padding, which short probes cannot always tell."""
        return True


class GPTCacheAdapter(CacheAdapter):
    """The example GPT (`examples/models/gpt.py`), whose cache is a list of (k, v) tuples."""

    family = "gpt"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        logits, presents = self.model(input_ids, attention_mask, position_ids, past_key_values=list(past))
        return (logits, *[t for kv in presents for t in kv])

    def cache_layout(self) -> list[tuple[int, int]]:
        layout = []
        for block in self.model.blocks:
            head_dim = block.attn.head_dim
            layout.append((block.attn.k_proj.out_features // head_dim, head_dim))
        return layout

    def vocab_size(self) -> int:
        return self.model.tok_emb.num_embeddings

    def max_positions(self) -> int | None:
        return self.model.pos_emb.num_embeddings

    def attention_window(self) -> bool:
        return False


class HFCacheAdapter(CacheAdapter):
    """A Hugging Face causal LM: the flat tensors become a `DynamicCache` and are read back."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.family = model.config.model_type
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns, then goes).
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (key, value) in enumerate(past):
            cache.update(key, value, i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        presents = []
        for layer in getattr(out, self.cache_argument).layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)

    def cache_layout(self) -> list[tuple[int, int]]:
        config = self.model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return [(kv_heads_of(config), head_dim)] * config.num_hidden_layers

    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().out_features

    def max_positions(self) -> int | None:
        config = self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def attention_window(self) -> bool:
        config = self.model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or []
        return bool(getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
                    or any(kind != "full_attention" for kind in layer_types))


def has_linear_projections(model: nn.Module) -> bool:
    """True when the blocks' projections are nn.Linear or GPT-2 Conv1D (captured as Linears):
    what planc's quantize pass rewrites."""
    linears = sum(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in model.modules())
    return linears > 1  # more than the lm_head alone


def kv_heads_of(config: Any) -> int:
    """Key/value heads per layer: grouped-query configs name them; Falcon's multi-query
    attention (`multi_query` without the new decoder architecture) has one."""
    heads = config.num_attention_heads
    if getattr(config, "model_type", "") == "falcon" and not getattr(config, "new_decoder_architecture", False):
        return 1 if getattr(config, "multi_query", False) else heads
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads


def adapt(model: nn.Module) -> CacheAdapter:
    """Wrap a decoder so that its cache is flat tensors; rejects models it cannot drive."""
    if isinstance(model, CacheAdapter):
        return model
    if is_hf_model(model):
        return HFCacheAdapter(model)
    if hasattr(model, "blocks") and hasattr(model, "tok_emb") and hasattr(model, "pos_emb"):
        return GPTCacheAdapter(model)
    raise UnsupportedDecoder(
        f"cannot export {type(model).__name__} as a decoder: expected a Hugging Face causal LM "
        "or the example GPT (examples/models/gpt.py)"
    )


def empty_past(layout: list[tuple[int, int]], batch: int, length: int = 0, generator=None):
    """A (key, value) per layer, random when `length` > 0 (export/probe inputs)."""
    return [
        (
            torch.randn(batch, heads, length, head_dim, generator=generator),
            torch.randn(batch, heads, length, head_dim, generator=generator),
        )
        for heads, head_dim in layout
    ]


def left_padded_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with rows right-aligned: padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
            mask[i, width - len(row) :] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1, clamped at 0 for the left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class UnsupportedDecoder(ValueError):
    """The model cannot be served as a decoder with a key/value cache; the message says why."""


