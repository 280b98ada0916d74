"""Sampling, stop strings, streaming and the CLI entry point."""

from __future__ import annotations

import io

import numpy as np
import pytest

from planc.backends.onnx.decoder.generate import Sampling, generate, generate_cli, generate_ids, next_tokens
from planc.backends.onnx.decoder.session import DecoderSession

PROMPTS = ["def main(", "import os\n", "x"]


@pytest.fixture(scope="module")
def session(artifacts):
    return DecoderSession(artifacts("gpt2"), threads=1)


def test_same_seed_same_tokens(session):
    rows = session.encode(PROMPTS)
    kwargs = dict(strategy="sample", temperature=1.5, top_k=50, top_p=0.95)
    first = generate_ids(session, rows, 16, seed=7, **kwargs)
    again = generate_ids(session, rows, 16, seed=7, **kwargs)
    other = generate_ids(session, rows, 16, seed=8, **kwargs)
    assert first == again
    assert first != other


def test_top_k_1_and_tiny_top_p_are_greedy(session):
    rows = session.encode(PROMPTS)
    greedy = generate_ids(session, rows, 10)
    assert generate_ids(session, rows, 10, strategy="sample", top_k=1, seed=3) == greedy
    assert generate_ids(session, rows, 10, strategy="sample", top_p=1e-6, seed=3) == greedy


def test_next_tokens_respects_filters():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    counts = lambda s: np.bincount(next_tokens(logits, s, rng), minlength=4) / 4000  # noqa: E731
    plain = counts(Sampling("sample"))
    np.testing.assert_allclose(plain, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = counts(Sampling("sample", top_k=2))
    assert top2[2:].sum() == 0 and abs(top2[0] - 0.625) < 0.03
    nucleus = counts(Sampling("sample", top_p=0.7))  # 0.5 then 0.3 reaches 0.8 >= 0.7: two tokens
    assert nucleus[2:].sum() == 0 and nucleus[1] > 0.3
    assert (next_tokens(logits[:3], Sampling("greedy"), rng) == 0).all()


@pytest.mark.parametrize("bad", [dict(strategy="beam"), dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1)])
def test_invalid_sampling_options(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)


def test_stop_strings_cut_the_text(session):
    full = generate(session, ["ab"], 24)[0]
    assert len(full) >= 6
    stop = full[3:5]
    first = full.find(stop)
    cut = generate(session, ["ab"], 24, stop=[stop])[0]
    assert cut == full[:first]


def test_stream_pieces_concatenate_to_the_result(session):
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    texts = generate(session, PROMPTS, 12, stream=lambda row, piece: pieces[row].append(piece))
    assert ["".join(pieces[i]) for i in range(3)] == texts
    assert max(len(p) for p in pieces.values()) > 1  # streamed over several steps, not at the end


def test_eos_ends_a_row(artifacts):
    session = DecoderSession(artifacts("llama"), threads=1)
    rows = session.encode(PROMPTS)
    free = generate_ids(session, rows, 12, eos_token_ids=[])
    stopper = free[0][2]  # pretend the third token of row 0 is end-of-sequence
    ended = generate_ids(session, rows, 12, eos_token_ids=[stopper])
    assert ended[0] == free[0][: free[0].index(stopper) + 1]


def test_generate_cli_streams_to_stdout(artifacts):
    out = io.StringIO()
    texts = generate_cli(artifacts("gpt"), ["hello"], 8, out=out)
    assert out.getvalue() == "hello" + texts[0] + "\n"
    out = io.StringIO()
    texts = generate_cli(artifacts("gpt"), ["a", "bc"], 4, out=out)
    assert out.getvalue() == f"### prompt 0\na{texts[0]}\n### prompt 1\nbc{texts[1]}\n"


def test_empty_prompt_is_an_error(session):
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate(session, [""], 4)


def test_batch_file(tmp_path, artifacts):
    from planc.backends.onnx.decoder.generate import read_prompts

    batch = tmp_path / "prompts.txt"
    batch.write_text("def f(\\n    return\n\nimport os\n")
    assert read_prompts(batch) == ["def f(\n    return", "import os"]
    out = io.StringIO()
    texts = generate_cli(artifacts("gpt"), ["x"], 3, batch_file=batch, out=out)
    assert len(texts) == 3 and out.getvalue().count("### prompt") == 3
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")
