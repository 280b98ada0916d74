"""Capture fallback: symbolic_trace with opaque leaves when torch.export refuses a model."""

from __future__ import annotations

import pytest
import torch

from planc.compiler.model import FrontendError, capture, load_model, model_output, module_table
from frontend_sources import factory_source, inputs

MODELS = '''
import torch
from torch import nn


class NumpyScale(nn.Module):
    """Goes through numpy: torch.export cannot follow it, symbolic_trace can keep it opaque."""

    def forward(self, x):
        return x * torch.from_numpy(x.detach().numpy().std(axis=-1, keepdims=True))


class Router(nn.Module):
    """Returns a Python int computed from data: nothing can trace through its use."""

    def forward(self, x):
        return int(x.abs().sum() > 0) + 1


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.scale = NumpyScale()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(self.scale(x))


class NumpyLM(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.emb = nn.Embedding(256, width)
        self.block = Block(width)
        self.head = nn.Linear(width, 256)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.block(self.emb(input_ids)))


class RoutedLM(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.emb = nn.Embedding(256, width)
        self.router = Router()
        self.head = nn.Linear(width, 256)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        for _ in range(self.router(x)):
            x = x + 1
        return self.head(x)


def numpy_lm():
    return NumpyLM()


def routed_lm():
    return RoutedLM()
'''


@pytest.fixture()
def models_dir(tmp_path):
    (tmp_path / "odd_models.py").write_text(MODELS)
    return tmp_path


def test_untraceable_submodule_becomes_an_opaque_leaf(models_dir):
    loaded = load_model(factory_source(models_dir, "odd_models.py:numpy_lm", inputs=inputs("input_ids", "attention_mask")))
    with pytest.raises(Exception):
        torch.export.export(loaded.model, (), kwargs=loaded.example_inputs, strict=False)
    gm = capture(loaded)
    info = gm.meta["planc_capture"]
    assert info["method"] == "symbolic_trace"
    assert info["leaves"] == ["block.scale"]
    assert "numpy" in info["export_error"]
    # The rest of the model is visible to passes: its Linears are call_module nodes.
    targets = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    assert {"emb", "block.scale", "block.proj", "head"} <= targets
    table = module_table(gm)
    assert ("block.scale", "NumpyScale") in table and ("block.proj", "Linear") in table
    for batch, seq in ((2, 7), (5, 19)):
        ids = torch.randint(1, 256, (batch, seq))
        sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        torch.testing.assert_close(model_output(loaded, gm, sample), model_output(loaded, loaded.model, sample))


def test_model_nothing_can_capture_names_the_failing_submodule(models_dir):
    loaded = load_model(factory_source(models_dir, "odd_models.py:routed_lm"))
    with pytest.raises(FrontendError) as caught:
        capture(loaded)
    message = str(caught.value)
    assert "cannot capture model 'm'" in message
    assert "torch.export failed" in message
    assert "submodule 'router' (Router)" in message
