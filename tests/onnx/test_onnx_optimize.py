"""ONNX-level optimization: fusions see through int8 weights, which become ORT integer kernels
computing what the planc ops compute."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from planc.backends.onnx import runtime
from planc.backends.onnx.export import export_model, save_model
from planc.backends.onnx.optimize import optimize_graph, probe_mask_kind
from planc.compiler import model as model_source
from onnx_helpers import linear_paths, run_passes
from planc.passes.quantize import Quantize

TEXTS = ["The train was late again.", "Rain is expected over the weekend, so the picnic moved indoors.", "Hi"]


def _compile(loaded, graph, tmp_path, **options):
    model = export_model(graph, loaded.example_inputs, loaded.dynamic_shapes)
    report = optimize_graph(model, **options)
    path = tmp_path / "model.onnx"
    save_model(model, path)
    return path, report, model


def _compare_with_graph(loaded, graph, path):
    """Sentence embeddings of the ONNX model vs the (quantized) torch graph: each text alone,
    then all in one padded batch."""
    session = runtime.create_session(path, ["CPUExecutionProvider"], threads=1)
    cosines = []
    for batch in [[text] for text in TEXTS] + [TEXTS]:
        inputs = loaded.tokenizer.encode_batch(batch)
        outputs = {k: torch.from_numpy(v) for k, v in runtime.run(session, inputs).items()}
        got = model_source.embed(outputs, inputs["attention_mask"])
        cosines.extend((got * model_source.model_output(loaded, graph, inputs)).sum(-1).tolist())
    return min(cosines)


@pytest.fixture(scope="module")
def bert_int8(tiny_bert):
    loaded, gm = tiny_bert
    graph, _ = run_passes(loaded, gm, (Quantize(scheme="int8"), linear_paths(loaded)))
    return loaded, graph


def test_int8_attention_becomes_qattention(bert_int8, tmp_path):
    loaded, graph = bert_int8
    path, report, _ = _compile(loaded, graph, tmp_path, fusions=True)
    assert report.fusions.get("attention") == 2
    assert report.lowered == {"QAttention": 2, "DynamicQuantizeMatMul": 6}
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "DequantizeLinear" not in ops and "MatMul" not in ops
    qattention = next(n for n in proto.graph.node if n.op_type == "QAttention")
    init = {i.name: i for i in proto.graph.initializer}
    assert init[qattention.input[1]].data_type == onnx.TensorProto.INT8
    assert list(init[qattention.input[1]].dims) == [64, 192]
    # The planc ops' reference numerics are those of ORT's integer kernels.
    assert _compare_with_graph(loaded, graph, path) > 0.9999


def test_padding_mask_is_recognised(bert_int8):
    loaded, graph = bert_int8
    model = export_model(graph, loaded.example_inputs, loaded.dynamic_shapes)
    from planc.backends.onnx.optimize import apply_fusions

    apply_fusions(model)
    attention = next(n for n in model.graph if n.op_type == "Attention")
    kind, mask_input = probe_mask_kind(model, attention.inputs[5])
    assert kind == "padding" and mask_input.name == "attention_mask"


def test_without_fusions_every_linear_is_a_dynamic_quantize_matmul(bert_int8, tmp_path):
    loaded, graph = bert_int8
    path, report, _ = _compile(loaded, graph, tmp_path, fusions=False)
    assert report.lowered == {"DynamicQuantizeMatMul": 12}
    assert _compare_with_graph(loaded, graph, path) > 0.9999


def test_static_int8_uses_the_calibrated_scales(tiny_bert, tmp_path):
    loaded, gm = tiny_bert
    graph, _ = run_passes(loaded, gm, (Quantize(scheme="int8", mode="static", calibration="unused.txt"), linear_paths(loaded)))
    path, report, _ = _compile(loaded, graph, tmp_path, fusions=True)
    assert set(report.lowered) <= {"QAttention", "MatMulIntegerToFloat"} and report.lowered
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "DynamicQuantizeLinear" not in ops and "DynamicQuantizeMatMul" not in ops
    assert _compare_with_graph(loaded, graph, path) > 0.999


def test_causal_lm_attention_falls_back_to_multi_head_attention(gpt, tmp_path):
    """The example GPT's mask keeps the diagonal of padded rows, which QAttention cannot express."""
    loaded, gm = gpt
    graph, _ = run_passes(loaded, gm, (Quantize(scheme="int8"), linear_paths(loaded)))
    path, report, _ = _compile(loaded, graph, tmp_path, fusions=True)
    assert "QAttention" not in report.lowered
    assert report.lowered.get("DynamicQuantizeMatMul", 0) >= 4
    session = runtime.create_session(path, ["CPUExecutionProvider"], threads=1)
    inputs = loaded.example_inputs
    got = next(iter(runtime.run(session, inputs).values()))
    with torch.no_grad():
        want = graph(**inputs)
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    mask = inputs["attention_mask"].bool().numpy()
    np.testing.assert_allclose(got[mask], want[mask], atol=2e-3 * np.abs(want).max())


def test_the_onnx_weights_are_the_quantize_pass_weights(bert_int8, tmp_path):
    """No requantization: ORT's kernels get the pass's int8 tensors and scales, transposed."""
    loaded, graph = bert_int8
    buffers = dict(graph.named_buffers())
    qweight = {name[: -len(".qweight")]: t for name, t in buffers.items() if name.endswith(".qweight")}
    scales = {name[: -len(".w_scale")]: t for name, t in buffers.items() if name.endswith(".w_scale")}
    assert len(qweight) == 12
    path, _, _ = _compile(loaded, graph, tmp_path, fusions=True)
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    layer = "encoder.layer.0."
    qkv = next(n for n in proto.graph.node if n.op_type == "QAttention")
    want = np.concatenate([qweight[layer + f"attention.self.{p}"].numpy().T for p in ("query", "key", "value")], axis=1)
    np.testing.assert_array_equal(inits[qkv.input[1]], want)
    want_scale = np.concatenate([scales[layer + f"attention.self.{p}"].numpy() for p in ("query", "key", "value")])
    np.testing.assert_array_equal(inits[qkv.input[4]], want_scale)
    matmuls = [n for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    stored = [inits[n.input[1]] for n in matmuls]
    for module in ("attention.output.dense", "intermediate.dense", "output.dense"):
        want = qweight[layer + module].numpy().T
        assert any(s.shape == want.shape and np.array_equal(s, want) for s in stored), module
