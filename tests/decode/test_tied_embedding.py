"""A tied embedding reads the int4 LM head's table: one table on disk, the same numbers in both.

Reference: ONNX Runtime's own MatMulNBits kernel, fed the identity, gives the head's dequantized
rows; the embedding's rows must equal them, and the fp32 table must be gone from the file.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from planc.backends.onnx.decoder.exporter import export_decoder


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _head_rows(model: onnx.ModelProto, vocab: int, width: int) -> np.ndarray:
    """The LM head's dequantized weights [vocab, width], computed by ORT's MatMulNBits on I."""
    inits = {i.name: i for i in model.graph.initializer}
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                and next(a.i for a in n.attribute if a.name == "N") == vocab)
    weights = [inits[name] for name in head.input[1:] if name]
    node = helper.make_node("MatMulNBits", ["x", *[w.name for w in weights]], ["y"], domain="com.microsoft",
                            **{a.name: helper.get_attribute_value(a) for a in head.attribute if a.name != "accuracy_level"})
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [width, width])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [width, vocab])], weights)
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(width, dtype=np.float32)})[0].T


def _embedding_rows(path, vocab: int) -> np.ndarray:
    """The embedding's output for every token id, read from the artifact's own graph."""
    model = onnx.load(str(path))
    gather = next(n for n in model.graph.node if n.input[1:2] == ["input_ids"])
    rows = gather.output[0]
    consumer = next((n for n in model.graph.node if rows in n.input and n.op_type == "Reshape"), None)
    output = consumer.output[0] if consumer is not None else rows
    model.graph.output.insert(0, helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        if value.name == "input_ids":  # every token id, one per row
            feeds[value.name] = np.arange(vocab, dtype=np.int64)[:, None]
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((vocab, 1), np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.zeros((vocab, 1), np.int64)
        elif value.name == "logits_to_keep":
            feeds[value.name] = np.array([0], np.int64)
        elif value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros([vocab, shape[1], 0, shape[3]], np.float32)
    return session.run([output], feeds)[0][:, 0]


def test_tied_int4_decoder_stores_one_table_and_embeds_the_heads_rows(tmp_path):
    model = _llama(tied=True)
    spec = export_decoder(model, tmp_path / "tied", quantize="int4", tokenizer="bytes")
    assert spec.tied_embedding is not None
    proto = onnx.load(str(tmp_path / "tied" / "model.onnx"))
    assert not [i.name for i in proto.graph.initializer if list(i.dims) == [512, 64]], "the fp32 table is still stored"
    assert any(n.op_type == "GatherBlockQuantized" for n in proto.graph.node)
    np.testing.assert_allclose(_embedding_rows(tmp_path / "tied" / "model.onnx", 512), _head_rows(proto, 512, 64), rtol=0, atol=1e-6)


def test_untied_embedding_keeps_its_own_table(tmp_path):
    model = _llama(tied=False)
    spec = export_decoder(model, tmp_path / "untied", quantize="int4", tokenizer="bytes")
    assert spec.tied_embedding is None
    proto = onnx.load(str(tmp_path / "untied" / "model.onnx"))
    table = next(numpy_helper.to_array(i) for i in proto.graph.initializer if list(i.dims) == [512, 64])
    np.testing.assert_array_equal(table, model.model.embed_tokens.weight.detach().numpy())
