"""Sample loading, sentence embeddings and the tensor verification compares; the bundled text."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from planc.compiler.model import FrontendError, embed, load_samples, model_output
from frontend_sources import EXAMPLES

SENTENCES = EXAMPLES / "data" / "sentences.txt"
HELDOUT = EXAMPLES / "data" / "dev_sentences.txt"


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_bundled_sentence_files_are_varied_and_disjoint():
    train, heldout = _lines(SENTENCES), _lines(HELDOUT)
    assert len(train) >= 100 and len(heldout) >= 80 and len(heldout) % 4 == 0
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    for line in train + heldout:
        assert line == line.strip() and 5 <= len(line.split()) <= 40, line
    lengths = [len(line.split()) for line in train]
    assert min(lengths) <= 6 and max(lengths) >= 25


def test_embed_is_masked_mean_then_unit_norm():
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    got = embed(hidden, mask)
    for row in range(3):
        real = hidden[row][mask[row].bool()]
        want = real.mean(dim=0)
        torch.testing.assert_close(got[row], want / want.norm())
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))


def test_padding_does_not_change_an_embedding(minilm):
    text = "The library closes early on Fridays."
    alone = minilm.tokenizer.encode_batch([text])
    padded = minilm.tokenizer.encode_batch([text, "A far longer sentence forces plenty of padding onto the first one here."])
    assert (padded["attention_mask"][0] == 0).any()
    torch.testing.assert_close(
        model_output(minilm, minilm.model, alone)[0], model_output(minilm, minilm.model, padded)[0], rtol=1e-4, atol=1e-5
    )


def test_heldout_paraphrases_are_nearest_neighbours(minilm):
    """The held-out file's structure is real: each line's closest other line is mostly its paraphrase."""
    heldout = _lines(HELDOUT)
    batch = minilm.tokenizer.encode_batch(heldout)
    vectors = model_output(minilm, minilm.model, batch)
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2.0)
    partner = torch.arange(len(heldout)) ^ 1  # lines (0,1), (2,3), ... are paraphrase pairs
    hits = (similarity.argmax(dim=1) == partner).float().mean().item()
    assert hits >= 0.85
    group = torch.arange(len(heldout)) // 4
    same_topic = (group[:, None] == group[None, :]) & (partner[:, None] != torch.arange(len(heldout))[None, :])
    same_topic.fill_diagonal_(False)
    unrelated = group[:, None] != group[None, :]
    paraphrase = similarity[torch.arange(len(heldout)), partner].mean()
    assert paraphrase > similarity[same_topic].mean() > similarity[unrelated].mean()


def test_model_output_is_logits_for_causal_lms(gpt):
    batch = gpt.tokenizer.encode_batch(["import os", "x = 1"], pad_left=True)
    with torch.no_grad():
        want = gpt.model(**batch)
    torch.testing.assert_close(model_output(gpt, gpt.model, batch), want)


def test_load_samples_resolves_against_the_plan_dir(minilm):
    samples = load_samples(minilm, "data/sentences.txt", count=5)
    assert len(samples) == 5
    first = _lines(SENTENCES)[0]
    assert minilm.tokenizer.decode(samples[0]["input_ids"][0]) == first.lower()
    assert all(set(s) == {"input_ids", "attention_mask", "token_type_ids"} for s in samples)
    assert all(s["input_ids"].shape[0] == 1 and s["attention_mask"].all() for s in samples)


def test_load_samples_with_fixed_seq_pads_decoders_on_the_left(gpt):
    samples = load_samples(gpt, SENTENCES, count=3, seq=64)
    assert [tuple(s["input_ids"].shape) for s in samples] == [(1, 64)] * 3
    first = _lines(SENTENCES)[0].encode("utf-8")
    assert samples[0]["input_ids"][0, -len(first):].tolist() == list(first)
    assert samples[0]["attention_mask"][0, 0] == 0


def test_load_samples_errors_and_short_files(minilm, tmp_path, caplog):
    with pytest.raises(FrontendError, match="sample file 'nope.txt' not found"):
        load_samples(minilm, "nope.txt", count=3)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(FrontendError, match="no non-blank lines"):
        load_samples(minilm, tmp_path / "blank.txt", count=3)
    (tmp_path / "two.txt").write_text("first line\n\nsecond line\n")
    with caplog.at_level(logging.WARNING):
        assert len(load_samples(minilm, tmp_path / "two.txt", count=10)) == 2
    assert "has 2 samples, 10 were asked for" in caplog.text


def test_embeddings_of_unrelated_sentences_differ(minilm):
    batch = minilm.tokenizer.encode_batch(["The cat sleeps on the sofa.", "Quarterly taxes are due in April."])
    vectors = model_output(minilm, minilm.model, batch)
    assert F.cosine_similarity(vectors[0], vectors[1], dim=0) < 0.5


def test_stdlib_calibration_is_windows_of_python_sources(gpt):
    """`calibration = stdlib`: full windows of real source text, spread over the library."""
    samples = load_samples(gpt, "stdlib", 4, seq=32)
    assert len(samples) == 4 and all(s["input_ids"].shape == (1, 32) for s in samples)
    texts = [bytes(int(i) for i in s["input_ids"][0] if i).decode("utf-8", errors="replace") for s in samples]
    assert len(set(texts)) == 4 and all(int(s["attention_mask"].sum()) == 32 for s in samples)
    assert any(word in "".join(texts) for word in ("def ", "import ", "return ", "self"))


def test_a_plan_may_calibrate_on_stdlib_without_a_file(tmp_path):
    from planc.compiler.validate import check_file

    plan = tmp_path / "s.plan"
    plan.write_text(f'model gpt = factory("{EXAMPLES}/models/gpt.py:gpt")\n'
                    "pipeline { quantize Linear { mode = static, calibration = stdlib } }\n")
    checked = check_file(plan)
    assert checked.ok, checked.diagnostics
