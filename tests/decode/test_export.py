"""The exported decoder graph: Optimum names, dynamic axes, decoder.json, tokenizer files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from planc.backends.onnx.decoder.cache_adapter import adapt
from planc.backends.onnx.decoder.exporter import DecoderSpec, export_decoder


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["gpt", "gpt2", "llama"])
def test_io_names_and_dynamic_axes(artifacts, decoders, name):
    model = onnx.load(artifacts(name) / "model.onnx")
    spec = DecoderSpec.load(artifacts(name))
    layout = adapt(decoders[name]).cache_layout()
    initializers = {i.name for i in model.graph.initializer}
    inputs = {i.name: _dims(i) for i in model.graph.input if i.name not in initializers}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    expected_in = ["input_ids", "attention_mask", "position_ids"]
    expected_out = ["logits"]
    for i in range(len(layout)):
        expected_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        expected_out += [f"present.{i}.key", f"present.{i}.value"]
    keep = spec.logits_to_keep
    assert list(inputs) == expected_in + ["logits_to_keep"] * keep
    assert list(outputs) == expected_out
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    heads, head_dim = layout[0]
    shared = spec.kv_buffer == "shared"
    past, present = ("past_buffer_length", "present_sequence_length") if shared else ("past_sequence_length", "total_sequence_length")
    assert inputs["past_key_values.0.key"] == ["batch_size", heads, past, head_dim]
    assert outputs["present.1.value"] == ["batch_size", heads, present, head_dim]
    assert outputs["logits"][0] == "batch_size"
    if keep:  # a plain input, fed by every caller: no initializer that would shadow it
        assert inputs["logits_to_keep"] == [1]
        assert model.graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert "logits_to_keep" not in initializers
    assert json.loads((artifacts(name) / "decoder.json").read_text())["inputs"] == list(inputs)


def test_onnx_runtime_loads_the_decoder_without_warnings(artifacts, capfd):
    """ONNX Runtime warns at load about an initializer that is also a graph input (it cannot
    fold it as a constant); a planc decoder has none, so a verbose load prints nothing of it."""
    import onnxruntime as ort

    assert DecoderSpec.load(artifacts("llama")).logits_to_keep
    options = ort.SessionOptions()
    options.log_severity_level = 1  # info and up: the warning is level 2
    capfd.readouterr()
    ort.InferenceSession(str(artifacts("llama") / "model.onnx"), options, providers=["CPUExecutionProvider"])
    logged = capfd.readouterr()
    assert "appears in graph inputs" not in logged.out + logged.err

def test_decoder_json(artifacts, llama_model):
    spec = DecoderSpec.load(artifacts("llama"))
    raw = json.loads((artifacts("llama") / "decoder.json").read_text())
    config = llama_model.config
    assert spec.n_layer == config.num_hidden_layers
    assert spec.n_head == config.num_key_value_heads == 2  # kv heads, not query heads
    assert spec.head_dim == config.hidden_size // config.num_attention_heads
    assert spec.vocab == config.vocab_size
    assert spec.eos_token_ids == [config.eos_token_id] and raw["eos_token_id"] == config.eos_token_id
    assert spec.pad_token_id == config.pad_token_id
    assert spec.tokenizer == {"kind": "hf", "path": "tokenizer.json"}
    assert (artifacts("llama") / "tokenizer.json").exists()
    assert raw["inputs"][3] == "past_key_values.0.key"


def test_byte_level_spec(artifacts):
    spec = DecoderSpec.load(artifacts("gpt"))
    assert spec.family == "gpt" and spec.tokenizer == {"kind": "bytes"}
    assert spec.max_positions == 128 and spec.vocab == 256 and spec.quantization is None


def test_config_only_directory_gets_seeded_random_weights(tmp_path, gpt2_model):
    """A plan may name an untrained architecture: a directory with config.json alone."""
    from planc.backends.onnx.decoder.exporter import load_hf_decoder

    gpt2_model.config.save_pretrained(tmp_path)
    first, second = load_hf_decoder(tmp_path), load_hf_decoder(tmp_path)
    ids = torch.tensor([[5, 9, 200, 17]])
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, second(ids).logits)
        assert not torch.allclose(first(ids).logits, gpt2_model(ids).logits)


def test_gpt2_artifact_matches_eager_logits(artifacts, gpt2_model):
    from planc.backends.onnx.decoder.session import DecoderSession

    session = DecoderSession(artifacts("gpt2"))
    ids = np.array([[5, 9, 200, 17], [1, 2, 3, 4]], np.int64)
    with torch.no_grad():
        eager = gpt2_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(session.logits(ids), eager, atol=1e-4, rtol=1e-4)


def test_rejects_other_modules(tmp_path):
    from planc.backends.onnx.decoder.cache_adapter import UnsupportedDecoder

    with pytest.raises(UnsupportedDecoder, match="cannot export"):
        export_decoder(torch.nn.Linear(4, 4), tmp_path / "x")


@pytest.mark.parametrize("family", ["falcon", "bloom"])
def test_multi_query_and_alibi_decoders_serve_with_a_consistent_cache(tmp_path, family):
    """Falcon (multi-query: one key/value head) and BLOOM (ALiBi biases) export, quantize to int8
    and generate what the eager model generates."""
    import transformers

    from planc.backends.onnx.decoder.exporter import DecoderSpec
    from planc.backends.onnx.decoder.verify import verify_decoder

    config = (transformers.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=True, new_decoder_architecture=False)
              if family == "falcon" else transformers.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    spec = export_decoder(model, tmp_path / family, quantize="int8")
    assert spec.kv_heads == [1, 1] if family == "falcon" else spec.kv_heads == [4, 4]
    metrics = verify_decoder(tmp_path / family, model, ["def main(", "import os\n"], 8)
    assert metrics["greedy_equal"] and metrics["top1"] >= 0.9, metrics
    assert DecoderSpec.load(tmp_path / family).quantization == "int8"


def test_small_vocab_needs_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32))
    with pytest.raises(ValueError, match="too small for byte-level"):
        export_decoder(model.eval(), tmp_path / "x", fusions=False)


def test_fusions_that_change_outputs_are_dropped(tmp_path, gpt_model, monkeypatch):
    """A fusion that alters the numbers (as ORT's GQA does on left padding) is not kept."""
    import onnx_ir as ir

    import planc.backends.onnx.decoder.fusions as decoder_fusions

    def bad_fusion(model) -> dict[str, int]:
        weight = model.graph.initializers["model.tok_emb.weight"]
        weight.const_value = ir.tensor(weight.const_value.numpy() * 1.5)
        return {"bad": 1}

    monkeypatch.setattr(decoder_fusions, "apply_ort_fusions", bad_fusion)
    spec = export_decoder(gpt_model, tmp_path / "art")
    assert spec.fusions == {}
    from planc.backends.onnx.decoder.session import DecoderSession

    ids = np.array([[3, 50, 7]], np.int64)
    with torch.no_grad():
        eager = gpt_model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(DecoderSession(tmp_path / "art").logits(ids), eager, atol=1e-4, rtol=1e-4)
