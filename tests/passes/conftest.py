"""Fixtures for the pass tests: the example GPT and MiniLM, captured once per session."""

from __future__ import annotations

import pytest
import torch

from pass_helpers import SENTENCES, capture, gpt_inputs, load_gpt_module
from shared_models import minilm_and_tokenizer


@pytest.fixture(scope="session")
def gpt_factory():
    return load_gpt_module().gpt


@pytest.fixture(scope="session")
def small_gpt(gpt_factory):
    torch.manual_seed(0)
    model = gpt_factory(n_layer=2)
    inputs = gpt_inputs()
    return model, inputs, capture(model, inputs)


@pytest.fixture(scope="session")
def minilm():
    model, tokenizer = minilm_and_tokenizer()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return model, tokenizer, inputs, capture(model, inputs, max_seq=512)
