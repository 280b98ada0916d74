"""Grouped-query attention from multi-head attention: each group's key/value heads mean-pooled.

`share_kv_heads(model, kv_heads)` rewrites a model's attention in place (Ainslie et al. 2023,
"GQA: training generalized multi-query transformer models from multi-head checkpoints"):

1. the query heads are cut into `kv_heads` groups of consecutive heads (head i joins group
   i // (heads / kv_heads), the order Hugging Face's `repeat_kv` and the example GPT's repeat
   the shared heads in);
2. the key and value projections become Linears with `kv_heads` output heads; shared head j's
   rows (and bias) are the mean of the rows of its group's heads;
3. the attention is told, where it keeps the number: the example GPT reads the grouping from
   its projections' shapes (its config gets `n_kv_head`); a Hugging Face Llama/Qwen2/Mistral-style
   attention reads `num_key_value_groups`, set with the config's `num_key_value_heads`.

A model that already shares heads (K key/value heads) is pooled further: `kv_heads` must
divide K, each new head the mean of K / kv_heads old ones (so of the same query heads' original
heads, in equal shares). `kv_heads = K` changes nothing. The model then computes attention with
the repeated shared heads and caches only `kv_heads` heads per layer; training (planc's
`target train`, distilled from the original) recovers what the pooling lost.

Supported: the example GPT (`examples/models/gpt.py`), and Hugging Face attentions whose code
repeats key/value heads itself: separate `k_proj`/`v_proj` Linears and a `num_key_value_groups`
attribute (Llama, Qwen2/3, Mistral, Gemma, ...). Anything else is `ShareError` saying why: a
fused q/k/v projection (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`) cannot be pooled per head
without rewriting the attention's code, and an attention that does not repeat heads (BERT, ...)
would compute wrong shapes.

Torch only: emit copies this file into the training program's runtime (`planc_runtime/gqa.py`;
`backends/train/shared_modules.py`), so the compiler and the trainer build the same grouped model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class ShareError(ValueError):
    """The model's attention cannot share key/value heads as asked; the message says why, and
    `option` names the plan option at fault (None: the model itself)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass
class AttentionSite:
    """One attention layer: its module path, query heads, current key/value heads, head size."""

    path: str
    module: nn.Module
    heads: int
    kv_heads: int
    head_dim: int


def pool_heads(linear: nn.Linear, head_dim: int, groups: int) -> nn.Linear:
    """A Linear whose output head j is the mean of `linear`'s heads j*groups .. (j+1)*groups - 1."""
    heads = linear.out_features // head_dim
    weight = linear.weight.detach()
    pooled = weight.reshape(heads // groups, groups, head_dim, linear.in_features).mean(1)
    new = nn.Linear(linear.in_features, (heads // groups) * head_dim, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(pooled.reshape(-1, linear.in_features))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach().reshape(heads // groups, groups, head_dim).mean(1).reshape(-1))
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _is_hf(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _fused_projection(model: nn.Module) -> str | None:
    """The name of a fused q/k/v projection in the model, if it has one."""
    for name, _ in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv"):
            return leaf
    return None


def _unsupported(model: nn.Module, why: str) -> ShareError:
    fused = _fused_projection(model)
    detail = (f"its queries, keys and values come out of one fused projection ('{fused}'), which cannot be "
              "pooled per head without rewriting the attention's code" if fused else why)
    return ShareError(
        f"cannot share key/value heads in {type(model).__name__}: {detail}; share supports the example GPT "
        "and Hugging Face attentions with separate k_proj/v_proj Linears that repeat key/value heads "
        "(num_key_value_groups: Llama, Qwen2, Mistral, ...)"
    )


def attention_sites(model: nn.Module) -> tuple[str, list[AttentionSite]]:
    """("gpt" | the HF model_type, every attention layer); ShareError for a model share cannot drive."""
    if _is_hf(model):
        config = _text_config(model)
        if getattr(config, "num_key_value_heads", None) is None:
            raise _unsupported(model, f"its config ({type(config).__name__}) has no num_key_value_heads")
        sites = [
            AttentionSite(path, module, module.q_proj.out_features // module.head_dim,
                          module.k_proj.out_features // module.head_dim, module.head_dim)
            for path, module in model.named_modules()
            if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
            and isinstance(getattr(module, "num_key_value_groups", None), int)
            and isinstance(getattr(module, "head_dim", None), int)
        ]
        if not sites:
            raise _unsupported(model, "no attention module has separate q_proj/k_proj/v_proj Linears "
                                      "and a num_key_value_groups to repeat key/value heads with")
        return str(getattr(config, "model_type", "hf")), sites
    if all(hasattr(model, n) for n in ("blocks", "tok_emb", "pos_emb")):
        sites = []
        for i, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
                raise _unsupported(model, f"block {i} has no attn with q_proj/k_proj/v_proj Linears")
            sites.append(AttentionSite(f"blocks.{i}.attn", attn, attn.q_proj.out_features // attn.head_dim,
                                       attn.k_proj.out_features // attn.head_dim, attn.head_dim))
        return "gpt", sites
    raise _unsupported(model, "it is neither the example GPT nor a Hugging Face model whose attention repeats "
                              "key/value heads")


def share_kv_heads(model: nn.Module, kv_heads: int) -> dict[str, Any]:
    """Pool every attention layer of `model` down to `kv_heads` key/value heads, in place.

    Returns what changed: family, layers, query heads, key/value heads before and after, and the
    key/value-cache elements per token before and after. ShareError when `kv_heads` does not
    divide a layer's key/value heads, or the model is not one share supports.
    """
    family, sites = attention_sites(model)
    for site in sites:
        if kv_heads < 1 or kv_heads > site.kv_heads or site.kv_heads % kv_heads:
            have = f"{site.heads} heads" if site.kv_heads == site.heads else f"{site.kv_heads} key/value heads"
            divisors = [n for n in range(1, site.kv_heads + 1) if site.kv_heads % n == 0]
            raise ShareError(f"kv_heads = {kv_heads} must divide the {have} of {site.path} "
                             f"(possible: {', '.join(map(str, divisors))})", option="kv_heads")
    before = sum(2 * s.kv_heads * s.head_dim for s in sites)
    summary = {"family": family, "layers": len(sites), "heads": sites[0].heads, "kv_heads_before": sites[0].kv_heads,
               "kv_heads": kv_heads, "cache_elements_per_token": [before, sum(2 * kv_heads * s.head_dim for s in sites)]}
    for site in sites:
        groups = site.kv_heads // kv_heads
        if groups > 1:
            site.module.k_proj = pool_heads(site.module.k_proj, site.head_dim, groups)
            site.module.v_proj = pool_heads(site.module.v_proj, site.head_dim, groups)
        if family != "gpt":
            site.module.num_key_value_groups = site.heads // kv_heads
            if isinstance(getattr(site.module, "num_key_value_heads", None), int):
                site.module.num_key_value_heads = kv_heads
    if family == "gpt":
        config = getattr(model, "config", None)
        if dataclasses.is_dataclass(config) and any(f.name == "n_kv_head" for f in dataclasses.fields(config)):
            model.config = dataclasses.replace(config, n_kv_head=kv_heads)
    else:
        _text_config(model).num_key_value_heads = kv_heads
        for site in sites:  # an attention may hold its own config object
            own = getattr(site.module, "config", None)
            if own is not None and hasattr(own, "num_key_value_heads"):
                own.num_key_value_heads = kv_heads
    return summary


class ShareKVHeads:
    """The compiler's handle on the pass (`passes/share/__init__.py` names it): `apply(model)`
    rewrites the eager model before it is captured; returns a one-line summary and details."""

    def __init__(self, options: Any) -> None:
        self.options = options

    def apply(self, model: nn.Module) -> tuple[str, dict[str, Any]]:
        details = share_kv_heads(model, self.options.kv_heads)
        before, after = details["cache_elements_per_token"]
        kind = "multi-query" if details["kv_heads"] == 1 else "grouped-query"
        return (f"{kind}: {details['kv_heads_before']} -> {details['kv_heads']} key/value heads per layer, "
                f"cache {before} -> {after} values/token", details)
