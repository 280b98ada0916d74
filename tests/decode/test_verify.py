"""verify_decoder: the numbers the compiler checks a decode target's goal against."""

from __future__ import annotations

import math

import pytest

from planc.backends.onnx.decoder.cache_adapter import adapt
from planc.backends.onnx.decoder.generate import generate_ids
from planc.backends.onnx.decoder.session import DecoderSession
from planc.backends.onnx.decoder.verify import eager_greedy, greedy_by_drafts, read_heldout, token_windows, verify_decoder


def test_fp32_verification(artifacts, decoders, heldout_files):
    result = verify_decoder(artifacts("llama"), decoders["llama"], heldout=heldout_files, max_tokens=1024)
    assert result["greedy_equal"] is True
    assert result["top1"] == 1.0
    assert math.isfinite(result["ppl_eager"]) and result["ppl_eager"] > 1
    assert abs(result["ppl_delta_rel"]) < 1e-4


def test_without_heldout_no_perplexity(artifacts, decoders):
    result = verify_decoder(artifacts("gpt"), decoders["gpt"], max_new_tokens=6)
    assert result["greedy_equal"] is True and result["top1"] == 1.0 and result["logits_max_rel_diff"] < 1e-4
    assert result["ppl_eager"] is None and result["ppl_delta"] is None


def test_heldout_windows(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij")
    (tmp_path / "b.txt").write_text("xyz")
    docs = [list(t.encode()) for t in read_heldout(tmp_path)]
    windows = token_windows(docs, 4, 100)
    assert windows.tolist() == [list(b"abcd"), list(b"efgh")]
    with pytest.raises(ValueError, match="shorter than one window"):
        token_windows(docs, 20, 100)
    with pytest.raises(FileNotFoundError):
        read_heldout(tmp_path / "missing")


class _CountingForwards:
    """An eager adapter that counts its forwards."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, 0

    def __call__(self, *args):
        self.calls += 1
        return self.adapter(*args)

    def __getattr__(self, name):
        return getattr(self.adapter, name)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_drafted_greedy_is_the_eager_models_own_greedy_decoding(artifacts, decoders, name):
    """Whatever the drafts, the result is the eager model's greedy decoding with its own cache;
    the artifact's own drafts (exact in fp32) settle every row in one eager forward, wrong
    drafts cost one forward more (the artifact drafts again from the eager model's token)."""
    session = DecoderSession(artifacts(name))
    rows = session.encode(["def main(", "import os\n", "x"])
    new, pad, eos = 6, session.spec.pad_token_id, session.spec.eos_token_ids
    reference = eager_greedy(decoders[name], rows, new, pad, eos)
    own = generate_ids(session, rows, new)
    wrong = [[(t + 1) % session.spec.vocab for t in row] for row in own]
    for drafts, forwards in ((own, 1), (wrong, 2)):
        counting = _CountingForwards(adapt(decoders[name].eval()))
        checked = greedy_by_drafts(session, counting, rows, drafts, new, pad, eos)
        assert checked.tokens == reference and counting.calls == forwards
        choices = checked.choices
        assert [len(c) for c in choices.eager] == [len(p) + len(t) for p, t in zip(rows, reference)]
        assert all((e == o).all() for e, o in zip(choices.eager, choices.onnx))  # fp32: the same argmax everywhere
        assert 0 <= choices.max_rel_diff < 1e-4
