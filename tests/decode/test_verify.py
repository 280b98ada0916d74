"""verify_decoder: the numbers the compiler checks a decode target's goal against."""

from __future__ import annotations

import math

import pytest

from planc.backends.onnx.decoder_verify import read_heldout, token_windows, verify_decoder


def test_fp32_verification(artifacts, decoders, heldout_files):
    result = verify_decoder(artifacts("llama"), decoders["llama"], heldout=heldout_files, max_tokens=1024)
    assert result["greedy_equal"] is True
    assert result["top1"] == 1.0
    assert math.isfinite(result["ppl_eager"]) and result["ppl_eager"] > 1
    assert abs(result["ppl_delta_rel"]) < 1e-4


def test_without_heldout_no_perplexity(artifacts, decoders):
    result = verify_decoder(artifacts("gpt"), decoders["gpt"], max_new_tokens=6)
    assert result["greedy_equal"] is True and result["top1"] == 1.0
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
