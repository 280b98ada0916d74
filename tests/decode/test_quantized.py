"""int8 / int4 decoder artifacts: integer weights really stored, next-token top-1 kept."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from planc.backends.onnx.decoder.exporter import DecoderSpec
from planc.backends.onnx.decoder.verify import verify_decoder

# llama: nn.Linear projections; gpt2: Conv1D, captured as Linears: both quantized by planc's
# pass; ONNX Runtime's tools (quantizer = ort) on the exported GPT-2 graph for comparison.
CASES = [("llama", "int8", "planc"), ("gpt2", "int8", "planc"), ("llama", "int4", "planc"), ("gpt2", "int4", "planc"),
         ("gpt2", "int8", "ort"), ("gpt2", "int4", "ort")]


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path / "model.onnx").graph.node)


def _int_weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(path / "model.onnx")
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and np.prod(i.dims) > 1024}


@pytest.mark.parametrize("name,scheme,quantizer", CASES)
def test_integer_weights_and_top1(artifacts, decoders, heldout_files, name, scheme, quantizer):
    art = artifacts(name, scheme, quantizer)
    spec = DecoderSpec.load(art)
    assert spec.quantization == scheme and spec.quantizer == quantizer
    ops = _ops(art)
    layers = spec.n_layer * (7 if name == "llama" else 4) + 1  # every projection + lm_head
    if scheme == "int8":
        assert ops["DynamicQuantizeMatMul"] + ops["MatMulInteger"] == layers
        assert any(w.dtype == np.int8 for w in _int_weights(art).values())
    else:
        # projections may share a MatMulNBits (q|k|v for GroupQueryAttention, gate|up): the int4
        # weights cover every projection's output columns exactly once, as the eager model has them
        widths = [next(a.i for a in n.attribute if a.name == "N") for n in onnx.load(art / "model.onnx").graph.node
                  if n.op_type == "MatMulNBits"]
        projections = [m for m in decoders[name].modules() if type(m).__name__ in ("Linear", "Conv1D")]
        assert sum(widths) == sum(m.weight.shape[0] if type(m).__name__ == "Linear" else m.weight.shape[1] for m in projections)
        assert len(widths) <= layers
        assert _int_weights(art)  # packed uint8 nibbles
    assert ops["MatMul"] == 0 or all(  # what is left multiplies activations only (attention)
        n.input[1] not in {i.name for i in onnx.load(art / "model.onnx").graph.initializer}
        for n in onnx.load(art / "model.onnx").graph.node if n.op_type == "MatMul"
    )
    fp32_size = os.path.getsize(artifacts(name) / "model.onnx")
    assert os.path.getsize(art / "model.onnx") < 0.7 * fp32_size
    result = verify_decoder(art, decoders[name], heldout=heldout_files[:1], window=64, max_tokens=2048)
    # int4 round-to-nearest on width-64 models measured 0.84-0.95; int8 0.97-0.99
    assert result["top1"] >= (0.9 if scheme == "int8" else 0.8), result["top1"]
    assert abs(result["ppl_delta_rel"]) < (0.02 if scheme == "int8" else 0.1), result
