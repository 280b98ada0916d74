"""Helpers of the share tests: generated text, next-token loss, the model shapes they use."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

WORDS = (
    "the a model token cache layer graph export run fast small byte text code list def return "
    "import class value key query head batch step print data file open read write loop"
).split()
GPT_SHAPE = {"vocab_size": 256, "n_layer": 2, "n_head": 4, "d_model": 64, "max_seq": 128}


def generated_bytes(lines: int, seed: int) -> torch.Tensor:
    """Byte ids of generated sentences (a seed per split: train and held-out never overlap)."""
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(lines))
    return torch.tensor(list(text.encode()))


def windows(ids: torch.Tensor, count: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq - 1, (count,), generator=generator)
    return torch.stack([ids[i : i + seq + 1] for i in starts.tolist()])


def next_token_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def hf_model(arch: str, kv_heads: int, seed: int = 0, vocab: int = 96):
    """A small Llama / Qwen2 / Mistral causal LM with 4 attention heads and `kv_heads` key/value heads."""
    import transformers

    configs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v biases
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    }
    config_class, model_class, extra = configs[arch]
    config = config_class(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64, **extra)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # larger weights than the init's: attention patterns that differ per head
        for name, param in model.named_parameters():
            if "proj" in name:
                param.normal_(0, 0.2)
    return model
