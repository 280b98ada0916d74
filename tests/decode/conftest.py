"""Tiny decoders and their exported artifacts, built once per test session.

- `gpt`: the example GPT (examples/models/gpt.py), byte-level;
- `gpt2`: a Hugging Face GPT-2 config saved with `save_pretrained` (byte-level vocab of 256);
- `llama`: a Llama config with grouped-query attention (2 kv heads for 4 heads) and its own
  BPE tokenizer trained here on generated text (tokenizer.json with <s>/</s>).
The two HF models are trained for a few seconds on generated text, so that their next-token
distributions are peaked as a real model's are (quantization checks mean little on the
near-uniform logits of a random model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decode_text import generated_text
from shared_models import example_gpt_module
from torch_threads import one_torch_thread  # noqa: F401  (autouse: one thread in this folder)

ROOT = Path(__file__).resolve().parents[2]
def train_bpe(directory: Path) -> tuple[int, int]:
    """A byte-level BPE tokenizer.json in `directory`; returns (bos id, eos id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(generated_text(400), trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save(str(directory / "tokenizer.json"))
    return bos, eos


def train_briefly(model, ids: torch.Tensor, steps: int = 150, seq: int = 64, batch: int = 16):
    """A few AdamW steps of next-token prediction on `ids` (1-D token stream)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[i : i + seq] for i in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decode_models")


@pytest.fixture(scope="session")
def gpt_model():
    torch.manual_seed(0)
    return example_gpt_module().gpt(vocab_size=256, n_layer=2, n_head=4, d_model=64, max_seq=128)


@pytest.fixture(scope="session")
def gpt2_dir(models_dir) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=None, eos_token_id=None)
    directory = models_dir / "gpt2"
    ids = torch.tensor(list("\n".join(generated_text(400, seed=1)).encode()))
    train_briefly(GPT2LMHeadModel(config), ids).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_model(gpt2_dir):
    from planc.backends.onnx.decoder.exporter import load_hf_decoder

    return load_hf_decoder(gpt2_dir)


@pytest.fixture(scope="session")
def llama_dir(models_dir) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = models_dir / "llama"
    directory.mkdir()
    bos, eos = train_bpe(directory)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    ids = torch.tensor(tokenizer.encode("\n".join(generated_text(600, seed=1))).ids)
    train_briefly(LlamaForCausalLM(config), ids).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def llama_model(llama_dir):
    from planc.backends.onnx.decoder.exporter import load_hf_decoder

    return load_hf_decoder(llama_dir)


@pytest.fixture(scope="session")
def decoders(gpt_model, gpt2_model, llama_model) -> dict:
    return {"gpt": gpt_model, "gpt2": gpt2_model, "llama": llama_model}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, decoders, gpt2_dir):
    """fp32 artifact of each model, exported on first use: name -> directory."""
    from planc.backends.onnx.decoder.exporter import export_decoder

    root = tmp_path_factory.mktemp("decode_artifacts")
    built: dict[str, Path] = {}

    def get(name: str, quantize: str | None = None, quantizer: str = "auto") -> Path:
        key = f"{name}-{quantize or 'fp32'}-{quantizer}"
        if key not in built:
            # gpt2 is exported from its save_pretrained directory, as plans name HF models
            source = gpt2_dir if name == "gpt2" and quantize is None else decoders[name]
            export_decoder(source, root / key, quantize=quantize, quantizer=quantizer)
            built[key] = root / key
        return built[key]

    return get


@pytest.fixture(scope="session")
def heldout_files(models_dir) -> list[Path]:
    """Held-out text: generated sentences of another seed than training, and a stdlib source."""
    import sysconfig

    generated = models_dir / "heldout.txt"
    generated.write_text("\n".join(generated_text(200, seed=5)))
    return [generated, Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"]
