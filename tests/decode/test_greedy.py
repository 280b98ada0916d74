"""fp32 artifacts decode exactly as the eager model does, batched with left padding too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planc.backends.onnx.decoder.cache_adapter import adapt, empty_past, position_ids_from_mask
from planc.backends.onnx.decoder.generate import generate_ids
from planc.backends.onnx.decoder.session import DecoderSession
from planc.backends.onnx.decoder.verify import eager_greedy

PROMPTS = ["def main(", "import os\n", "the cache", "x = [1, 2, 3]\nprint(x"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def sessions(artifacts):
    return {name: DecoderSession(artifacts(name), threads=1) for name in ("gpt", "gpt2", "llama")}


@pytest.mark.parametrize("name", ["gpt", "gpt2", "llama"])
def test_batched_greedy_equals_eager(sessions, decoders, name):
    session = sessions[name]
    rows = session.encode(PROMPTS)
    assert len({len(r) for r in rows}) > 1  # the batch really is left-padded
    onnx_tokens = generate_ids(session, rows, NEW_TOKENS)
    eager = eager_greedy(decoders[name], rows, NEW_TOKENS, session.spec.pad_token_id, session.spec.eos_token_ids)
    assert onnx_tokens == eager
    assert sum(len(r) for r in onnx_tokens) > len(PROMPTS)  # something was generated


@pytest.mark.parametrize("name", ["gpt", "gpt2", "llama"])
def test_single_prompts_equal_batch(sessions, decoders, name):
    session = sessions[name]
    rows = session.encode(PROMPTS)
    batched = generate_ids(session, rows, NEW_TOKENS)
    single = [generate_ids(session, [row], NEW_TOKENS)[0] for row in rows]
    assert single == batched
    eager_single = [
        eager_greedy(decoders[name], [row], NEW_TOKENS, session.spec.pad_token_id, session.spec.eos_token_ids)[0]
        for row in rows
    ]
    assert single == eager_single


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_prefill_then_decode_steps_match_full_forward(sessions, decoders, name):
    """Dynamic past length: the cached logits of each step equal a cache-less eager forward."""
    session = sessions[name]
    adapter = adapt(decoders[name])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, session.spec.vocab, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    with torch.no_grad():
        full = adapter(ids, mask, position_ids_from_mask(mask), empty_past(adapter.cache_layout(), 2))[0].numpy()
    prompt = 4
    logits = session.prefill(ids[:, :prompt].numpy(), mask[:, :prompt].numpy(), max_new_tokens=5)
    np.testing.assert_allclose(logits, full[:, prompt - 1], atol=1e-4, rtol=1e-4)
    for t in range(prompt, ids.shape[1]):
        logits = session.step(ids[:, t].numpy())
        np.testing.assert_allclose(logits, full[:, t], atol=1e-4, rtol=1e-4)


def test_decode_beyond_reserved_room(sessions):
    """step() past the room reserved at prefill grows the mask instead of failing."""
    session = sessions["gpt"]
    session.prefill(np.array([[10, 11]], np.int64), np.ones((1, 2), np.int64), max_new_tokens=1)
    for token in range(20):
        logits = session.step(np.array([token + 30]))
    assert logits.shape == (1, 256) and np.isfinite(logits).all()


def test_too_long_for_positions(sessions):
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        generate_ids(sessions["gpt"], [[1] * 100], 40)


def test_planc_run_on_a_decoder_prints_its_next_tokens(artifacts, decoders, capsys):
    """`planc run` on a key/value-cache artifact generates: the prompt and its greedy continuation."""
    from planc.backends.onnx.decoder.exporter import DecoderSpec
    from planc.compiler.cli import main

    art = artifacts("gpt")
    spec = DecoderSpec.load(art)
    assert main(["run", str(art), "--input", "def main(", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    expected = eager_greedy(decoders["gpt"], [list(b"def main(")], 6, spec.pad_token_id, spec.eos_token_ids)[0]
    assert out == "def main(" + bytes(expected).decode("utf-8", errors="replace") + "\n"
    assert len(out) < 200
