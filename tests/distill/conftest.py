"""Fixtures of the distillation tests: MiniLM, its tokenizer and a captured graph, once per session."""

from __future__ import annotations

import pytest

from distill_helpers import TEXTS, capture
from shared_models import minilm_and_tokenizer


@pytest.fixture(scope="session")
def minilm():
    model, tokenizer = minilm_and_tokenizer()
    inputs = {k: v for k, v in tokenizer(TEXTS, padding=True, return_tensors="pt").items() if k != "token_type_ids"}
    return model, tokenizer, inputs, capture(model, inputs)
