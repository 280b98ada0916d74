"""Capture: the graph equals the eager model, at shapes other than the example's (dims are dynamic)."""

from __future__ import annotations

import sys

import pytest
import torch

from planc.compiler.model import capture, load_model, model_output, module_table
from frontend_sources import EXAMPLES, REPO, factory_source, gpt_source, inputs, minilm_source

SHORT = ["Good morning.", "The bus is late."]
LONG = [
    "A much longer sentence, written so that this batch has a different sequence length from the example.",
    "Short one.",
    "Three friends shared a pizza on the roof while the sun went down over the harbour.",
    "Rain.",
    "Is the museum open on public holidays, or only during the week?",
]


def test_minilm_is_an_encoder_with_padded_examples(minilm):
    assert minilm.task == "encoder"
    assert set(minilm.example_inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    mask = minilm.example_inputs["attention_mask"]
    assert mask.shape[0] >= 2 and (mask == 0).any() and (mask == 1).any()
    # Real tokens: the example is not all one id.
    assert minilm.example_inputs["input_ids"].unique().numel() > 10
    assert not minilm.model.training and next(minilm.model.parameters()).dtype == torch.float32


def test_minilm_capture_matches_eager_at_two_shapes(minilm, minilm_graph):
    assert minilm_graph.meta["planc_capture"]["method"] == "export"
    shapes = set()
    for texts in (SHORT, LONG):
        batch = minilm.tokenizer.encode_batch(texts)
        shapes.add(tuple(batch["input_ids"].shape))
        assert tuple(batch["input_ids"].shape) != tuple(minilm.example_inputs["input_ids"].shape)
        with torch.no_grad():
            got = minilm_graph(**batch).last_hidden_state
            want = minilm.model(**batch).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            model_output(minilm, minilm_graph, batch), model_output(minilm, minilm.model, batch), rtol=1e-4, atol=1e-5
        )
    assert len(shapes) == 2


def test_gpt_factory_capture_matches_eager_at_two_shapes(gpt):
    assert gpt.task == "causal_lm"
    assert gpt.max_positions == 256
    gm = capture(gpt)
    assert gm.meta["planc_capture"]["method"] == "export"
    for texts, seq in ((["def f(x):", "return 1"], None), ([t[:40] for t in LONG], 97)):
        batch = gpt.tokenizer.encode_batch(texts, seq=seq, pad_left=True)
        logits = model_output(gpt, gm, batch)
        assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[2] == 256
        torch.testing.assert_close(logits, model_output(gpt, gpt.model, batch), rtol=1e-4, atol=1e-5)


def test_same_dim_name_is_the_same_export_dim(minilm, gpt):
    shapes = minilm.dynamic_shapes
    assert shapes["input_ids"][0] is shapes["attention_mask"][0] is shapes["token_type_ids"][0]
    assert shapes["input_ids"][1] is shapes["attention_mask"][1]
    assert shapes["input_ids"][1].max == 512
    assert gpt.dynamic_shapes["input_ids"][1].max == 256


def test_fixed_dims_are_honoured_and_left_static():
    loaded = load_model(gpt_source(inputs=inputs("input_ids", "attention_mask", dims=(3, "seq"))))
    assert loaded.example_inputs["input_ids"].shape[0] == 3
    assert 0 not in loaded.dynamic_shapes["input_ids"] and 1 in loaded.dynamic_shapes["input_ids"]
    gm = capture(loaded)
    batch = loaded.tokenizer.encode_batch(["a", "bb", "ccc"], seq=11, pad_left=True)
    torch.testing.assert_close(model_output(loaded, gm, batch), model_output(loaded, loaded.model, batch))


def test_module_table_names_modules_of_model_and_graph(minilm, minilm_graph):
    eager = module_table(minilm.model)
    graph = module_table(minilm_graph)
    assert ("encoder.layer.0.attention.self.query", "Linear") in eager
    assert ("encoder.layer.0.attention.self.query", "Linear") in graph
    assert ("embeddings.word_embeddings", "Embedding") in graph
    # The graph's table comes from node metadata and names only real modules of the model.
    assert set(graph) <= set(eager)
    linears = [path for path, kind in eager if kind == "Linear"]
    assert len(linears) == 6 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + pooler


def test_factory_by_importable_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_models.py").write_text(
        "import torch\n"
        "class Tagger(torch.nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(256, width)\n"
        "        self.out = torch.nn.Linear(width, 3)\n"
        "    def forward(self, input_ids):\n"
        "        return self.out(self.emb(input_ids))\n"
        "def build(width=8):\n"
        "    return Tagger(width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(factory_source(REPO, "tiny_models:build", args={"width": 4}, name="tiny"))
    assert loaded.model.out.in_features == 4
    assert loaded.task == "encoder"  # 3 outputs, not vocabulary-sized
    sys.modules.pop("tiny_models", None)


def test_dotted_factory_falls_back_to_a_file_next_to_the_plan():
    # `models.gpt` is importable from nowhere but the plan's own folder (examples/).
    loaded = load_model(gpt_source(ref="models.gpt:gpt", base_dir=REPO / "examples"))
    assert loaded.origin.endswith("gpt.py:gpt")


def test_random_factory_init_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_model(gpt_source())
    after = torch.rand(1)
    second = load_model(gpt_source())
    assert torch.equal(after, expected_next)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert EXAMPLES.is_dir()


def test_graph_owns_its_weights(gpt):
    gm = capture(gpt)
    graph_weight = dict(gm.named_parameters())["blocks.0.attn.q_proj.weight"]
    eager_weight = gpt.model.blocks[0].attn.q_proj.weight
    assert graph_weight.data_ptr() != eager_weight.data_ptr()
    batch = gpt.tokenizer.encode_batch(["print('hi')", "x = 2"], pad_left=True)
    before = model_output(gpt, gpt.model, batch)
    with torch.no_grad():
        graph_weight.zero_()
    # A pass rewriting the graph leaves the eager reference alone ...
    torch.testing.assert_close(model_output(gpt, gpt.model, batch), before)
    # ... and really changes the graph.
    assert not torch.allclose(model_output(gpt, gm, batch), before)


def test_a_module_passed_in_replaces_the_source(minilm):
    from planc.compiler.model import ByteTokenizer, FrontendError, HFTokenizer

    model = load_model(gpt_source()).model
    loaded = load_model(gpt_source(ref="models/missing.py:gpt"), module=model)
    assert loaded.model is model and "passed to compile()" in loaded.origin
    assert loaded.task == "causal_lm" and isinstance(loaded.tokenizer, ByteTokenizer)
    hf = load_model(minilm_source(), module=minilm.model)
    assert hf.task == "encoder" and isinstance(hf.tokenizer, HFTokenizer) and hf.max_positions == 512
    with pytest.raises(FrontendError, match="not a torch.nn.Module"):
        load_model(gpt_source(), module="not a model")
