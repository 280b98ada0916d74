"""Tokenizers produce exactly the declared inputs, pad on the requested side, and mask padding."""

from __future__ import annotations

import pytest
import torch

from planc.compiler.model import ByteTokenizer, FrontendError, HFTokenizer
from frontend_sources import inputs


def test_byte_tokenizer_round_trips_text():
    tokenizer = ByteTokenizer(inputs("input_ids", "attention_mask"), max_length=256)
    texts = ["def main():\n    return 0\n", "naïve café ☕", "x"]
    batch = tokenizer.encode_batch(texts)
    assert batch["input_ids"].shape == (3, max(len(t.encode("utf-8")) for t in texts))
    for row, text in zip(batch["input_ids"], texts):
        assert tokenizer.decode(row) == text
    encoded = list(texts[1].encode("utf-8"))
    assert batch["input_ids"][1, : len(encoded)].tolist() == encoded


def test_both_byte_tokenizers_read_id_0_as_padding_and_end_of_text():
    """The compiler's tokenizer pads with 0; the decoder runtime reads the same ids (padded
    prompts, finished rows fed padding) and must give the same text: 0 is left out by both."""
    from planc.backends.onnx.decoder.tokenizer import ByteTokenizer as RuntimeByteTokenizer

    compiler, runtime = ByteTokenizer(inputs("input_ids", "attention_mask"), None), RuntimeByteTokenizer()
    ids = [0, 0, *"héllo".encode("utf-8"), 0, ord("!"), 0]
    assert compiler.decode(torch.tensor(ids)) == runtime.decode(ids) == "héllo!"
    assert compiler.pad_id == compiler.eos_id == 0
    padded = compiler.encode_batch(["hi", "a longer text"], pad_left=True)["input_ids"][0].tolist()
    assert padded[0] == 0 and runtime.decode(padded) == "hi"


def test_byte_tokenizer_pads_left_or_right_and_masks():
    tokenizer = ByteTokenizer(inputs("input_ids", "attention_mask", "position_ids"), max_length=None)
    right = tokenizer.encode_batch(["abcd", "ab"])
    left = tokenizer.encode_batch(["abcd", "ab"], pad_left=True)
    assert right["input_ids"][1].tolist() == [97, 98, 0, 0]
    assert right["attention_mask"][1].tolist() == [1, 1, 0, 0]
    assert left["input_ids"][1].tolist() == [0, 0, 97, 98]
    assert left["attention_mask"][1].tolist() == [0, 0, 1, 1]
    # Positions count real tokens, so a left-padded text starts at position 0.
    assert left["position_ids"][1].tolist() == [0, 0, 0, 1]
    assert right["position_ids"][0].tolist() == [0, 1, 2, 3]


def test_fixed_seq_truncates_and_pads():
    tokenizer = ByteTokenizer(inputs("input_ids", "attention_mask"), max_length=8)
    batch = tokenizer.encode_batch(["abcdefghijkl", "a"], seq=5)
    assert batch["input_ids"].tolist() == [[97, 98, 99, 100, 101], [97, 0, 0, 0, 0]]
    assert tokenizer.encode_batch(["abcdefghijkl"])["input_ids"].shape == (1, 8)
    with pytest.raises(FrontendError, match="exceeds the model's maximum of 8"):
        tokenizer.encode_batch(["a"], seq=9)


def test_declared_dtypes_and_names_only():
    tokenizer = ByteTokenizer(inputs("input_ids", dtype="int32") + inputs("attention_mask", dtype="bool"), None)
    batch = tokenizer.encode_batch(["hi", "hello"])
    assert list(batch) == ["input_ids", "attention_mask"]
    assert batch["input_ids"].dtype == torch.int32 and batch["attention_mask"].dtype == torch.bool


def test_hf_tokenizer_pads_left_when_asked_and_masks(minilm):
    tokenizer = minilm.tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.pad_id == 0 and tokenizer.vocab_size == 30522 and tokenizer.max_length == 512
    texts = ["A cat.", "The quick brown dog jumps over the lazy fox."]
    right = tokenizer.encode_batch(texts)
    left = tokenizer.encode_batch(texts, pad_left=True)
    assert set(right) == {"input_ids", "attention_mask", "token_type_ids"}
    pads = int((right["attention_mask"][0] == 0).sum())
    assert pads > 0
    assert right["input_ids"][0, -pads:].eq(tokenizer.pad_id).all()
    assert left["input_ids"][0, :pads].eq(tokenizer.pad_id).all()
    assert left["attention_mask"][0, :pads].eq(0).all() and left["attention_mask"][0, pads:].eq(1).all()
    assert torch.equal(right["attention_mask"].sum(1), left["attention_mask"].sum(1))
    # The real tokens are the same on both sides; decoding gives the (lower-cased) text back.
    assert torch.equal(right["input_ids"][0, : right["input_ids"].shape[1] - pads], left["input_ids"][0, pads:])
    assert tokenizer.decode(right["input_ids"][1]) == texts[1].lower()


def test_hf_tokenizer_fixed_seq(minilm):
    batch = minilm.tokenizer.encode_batch(["one", "two words here " * 20], seq=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][1].all() and not batch["attention_mask"][0].all()
