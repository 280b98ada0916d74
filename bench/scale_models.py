"""Random-init checkpoints with the exact shapes of public decoders, written tensor by tensor.

A real checkpoint is a Hugging Face directory: `config.json`, bf16 `*.safetensors` shards with
`model.safetensors.index.json`, and a tokenizer. Random weights test what does not depend on
training: memory, time, size, and export exactness (fp32 artifact vs eager). The writer never
holds the model: each tensor is generated in row chunks and appended to its shard, whose header
(names, dtypes, shapes, offsets) is known before the first byte of data is written.

    python bench/scale_models.py llama-3.2-1b /tmp/scale/llama-3.2-1b
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

#: What Llama 3.1 and 3.2 share (vocabulary, RoPE scaling, norms, tied head for 3.2).
_LLAMA3: dict = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": True,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}

#: The public configurations (Hugging Face `config.json` fields that fix the shapes and the math).
CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "hidden_act": "silu", "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
    },
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    "llama-3.2-3b": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
                     "rope_scaling": {**_LLAMA3["rope_scaling"], "factor": 8.0}},
}

#: Largest shard, as Hugging Face writes them.
SHARD_BYTES = 5 * 10**9


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of a Llama/Qwen2 causal LM, in the order transformers names them."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    biased = config["model_type"] == "qwen2"  # Qwen2 has q/k/v biases
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
        ]
        if biased:
            shapes += [(p + "self_attn.q_proj.bias", (heads * head_dim,)), (p + "self_attn.k_proj.bias", (kv_heads * head_dim,)),
                       (p + "self_attn.v_proj.bias", (kv_heads * head_dim,))]
        shapes += [
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def parameter_count(config: dict) -> int:
    count = 0
    for _, shape in tensor_shapes(config):
        size = 1
        for dim in shape:
            size *= dim
        count += size
    return count


def _chunks(name: str, shape: tuple[int, ...], generator: torch.Generator, rows: int = 8192) -> Iterator[bytes]:
    """The tensor's bf16 bytes, a block of rows at a time: norms are ones, weights N(0, 0.02),
    biases small."""
    if name.endswith("norm.weight"):
        yield torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
        return
    std = 0.01 if name.endswith(".bias") else 0.02
    total = shape[0]
    for start in range(0, total, rows):
        block = (min(rows, total - start), *shape[1:])
        values = (torch.randn(block, generator=generator) * std).to(torch.bfloat16)
        yield values.view(torch.int16).numpy().tobytes()


def _shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


#: The tokenizer's end-of-text token (id 256), as real checkpoints ship one.
END_OF_TEXT = "<|endoftext|>"


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer with no merges: ids 0..255 are the bytes, 256 ends text (fits
    every vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    char_of = _gpt2_byte_chars()
    tokenizer = Tokenizer(models.BPE(vocab={char_of[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "eos_token": END_OF_TEXT, "model_max_length": 131072},
                                                          indent=2) + "\n")


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return chars


def write_checkpoint(name: str, out: str | Path, seed: int = 0) -> Path:
    """Write the random-init checkpoint of `name` (a key of CONFIGS) into `out`; returns `out`.

    Skips the work when `out` already holds a complete checkpoint of the same config."""
    config = {**CONFIGS[name], "torch_dtype": "bfloat16", "transformers_version": "4.46.0"}
    out = Path(out)
    marker = out / ".complete"
    if marker.exists() and json.loads((out / "config.json").read_text()) == config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config)
    shards = _shards(shapes)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
        offset = 0
        for tensor, shape in shard:
            nbytes = 2 * _numel(shape)
            header[tensor] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[tensor] = file
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        tmp = out / (file + ".tmp")
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for tensor, shape in shard:
                for chunk in _chunks(tensor, shape, generator):
                    f.write(chunk)
        tmp.rename(out / file)
    if len(shards) > 1:
        total = sum(2 * _numel(shape) for _, shape in shapes)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"],
                                                            "eos_token_id": config["eos_token_id"]}) + "\n")
    write_byte_tokenizer(out)
    marker.write_text("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(CONFIGS))
    parser.add_argument("out")
    args = parser.parse_args(argv)
    out = write_checkpoint(args.name, args.out)
    params = parameter_count(CONFIGS[args.name])
    print(f"{args.name}: {params / 1e9:.2f}B parameters, {2 * params / 1e9:.2f} GB bf16 in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
