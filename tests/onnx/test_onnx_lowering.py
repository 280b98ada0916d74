"""planc's quantized ops -> ONNX: exported numerics match the ops' reference kernels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import planc.passes.qops as qops
from planc.passes.cpu import FORMATS, int8_format
from planc.backends.onnx import runtime
from planc.backends.onnx.export import export_model, save_model
from planc.backends.onnx.optimize import optimize_graph

#: Whether ONNX Runtime's integer sums saturate on the CPU running this test (read, not assumed):
#: the reference op then computes exactly what ORT computes here, for either target's weights.
HOST_SATURATES = int8_format("auto").arithmetic == "u8s8_sat16"
TARGETS = ["x86_avx2", "x86_vnni"]

DIMS = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}


class OneOp(torch.nn.Module):
    """Calls `fn(self, x)` with the given tensors registered as buffers."""

    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, x):
        return self.fn(self, x)


def _run(module, x, tmp_path, optimize=False):
    model = export_model(module, {"x": x}, DIMS)
    report = optimize_graph(model, fusions=False) if optimize else None
    path = tmp_path / "m.onnx"
    save_model(model, path)
    session = runtime.create_session(path, ["CPUExecutionProvider"], threads=1)
    return runtime.run(session, {"x": x}), onnx.load(str(path)), report


def _initializer_types(proto):
    return {init.name: init.data_type for init in proto.graph.initializer}


@pytest.fixture(params=TARGETS)
def int8_linear(request):
    torch.manual_seed(0)
    q, scale = qops.quantize_per_channel_int8(torch.randn(48, 64), FORMATS[request.param].weight_max)
    return OneOp(lambda m, x: torch.ops.planc.linear_int8_dynamic(x, m.q, m.s, m.b, HOST_SATURATES), q=q, s=scale, b=torch.randn(48))


def test_int8_dynamic_becomes_dynamic_quantize_matmul_with_reference_numerics(int8_linear, tmp_path):
    x = torch.randn(2, 5, 64)
    outputs, proto, report = _run(int8_linear, x, tmp_path, optimize=True)
    want = int8_linear(x).numpy()
    got = next(iter(outputs.values()))
    # Same integer arithmetic as ORT; only float rounding of the final scale product differs.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert report.lowered == {"DynamicQuantizeMatMul": 1}
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["DynamicQuantizeMatMul"]  # the bias Add is folded into the kernel
    weight = next(i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8)
    assert list(weight.dims) == [64, 48]
    assert not any(i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [64, 48] for i in proto.graph.initializer)


@pytest.mark.parametrize("cpu", TARGETS)
def test_int8_per_tensor_scale_and_no_bias(tmp_path, cpu):
    torch.manual_seed(1)
    q, scale = qops.quantize_per_tensor_int8(torch.randn(32, 16), FORMATS[cpu].weight_max)
    module = OneOp(lambda m, x: torch.ops.planc.linear_int8_dynamic(x, m.q, m.s, None, HOST_SATURATES), q=q, s=scale)
    x = torch.randn(3, 4, 16)
    outputs, _, _ = _run(module, x, tmp_path, optimize=True)
    want = module(x).numpy()
    np.testing.assert_allclose(next(iter(outputs.values())), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("cpu", TARGETS)
def test_int8_static_becomes_matmul_integer_to_float(tmp_path, cpu):
    torch.manual_seed(2)
    q, scale = qops.quantize_per_channel_int8(torch.randn(24, 32), FORMATS[cpu].weight_max)
    x = torch.randn(2, 3, 32)
    x_scale, x_zp = qops.quantize_activation_params(float(x.min()), float(x.max()))
    module = OneOp(lambda m, x: torch.ops.planc.linear_int8_static(x, x_scale, x_zp, m.q, m.s, m.b, HOST_SATURATES),
                   q=q, s=scale, b=torch.randn(24))
    outputs, proto, report = _run(module, x, tmp_path, optimize=True)
    want = module(x).numpy()
    np.testing.assert_allclose(next(iter(outputs.values())), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert report.lowered == {"MatMulIntegerToFloat": 1}
    assert onnx.TensorProto.INT8 in _initializer_types(proto).values()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_is_matmul_nbits_in_planc_layout(symmetric, tmp_path):
    torch.manual_seed(3)
    packed, scales, zero_points = qops.pack_int4(torch.randn(40, 48), 32, symmetric=symmetric)
    module = OneOp(
        lambda m, x: torch.ops.planc.linear_int4(x, m.p, m.s, None if symmetric else m.z, 48, 32, m.b),
        p=packed,
        s=scales,
        z=zero_points if zero_points is not None else torch.zeros(1, dtype=torch.uint8),
        b=torch.randn(40),
    )
    x = torch.randn(2, 6, 48)
    outputs, proto, _ = _run(module, x, tmp_path)
    want = module(x).numpy()
    np.testing.assert_allclose(next(iter(outputs.values())), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (4, 32, 48, 40)
    assert _initializer_types(proto)[nbits[0].input[1]] == onnx.TensorProto.UINT8


def test_embedding_int8_is_an_int8_gather(tmp_path):
    torch.manual_seed(4)
    q, scale = qops.quantize_per_channel_int8(torch.randn(100, 16))
    module = OneOp(lambda m, x: torch.ops.planc.embedding_int8(x, m.q, m.s), q=q, s=scale)
    ids = torch.randint(0, 100, (2, 7))
    outputs, proto, _ = _run(module, ids, tmp_path)
    np.testing.assert_array_equal(next(iter(outputs.values())), module(ids).numpy())
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and _initializer_types(proto).get(n.input[0]) == onnx.TensorProto.INT8)
    assert gather is not None


@pytest.mark.parametrize("scheme,block", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantize_embeddings_bounds_the_reconstruction_error(scheme, block, tmp_path):
    torch.manual_seed(5)
    table = torch.randn(2048, 128)
    module = OneOp(lambda m, x: torch.nn.functional.embedding(x, m.t), t=table)
    ids = torch.randint(0, 2048, (2, 9))
    model = export_model(module, {"x": ids}, DIMS)
    done = optimize_graph(model, fusions=False, embeddings=scheme, embedding_block=block).embeddings
    assert len(done) == 1
    path = tmp_path / "e.onnx"
    save_model(model, path)
    got = runtime.run(runtime.create_session(path, ["CPUExecutionProvider"], 1), {"x": ids})
    got = next(iter(got.values()))
    want = table[ids].numpy()
    rows = np.abs(want).max(-1, keepdims=True)
    # int8: half a step of amax/127 per row. int4 clips each block's range by at most 40% (the
    # clipping that minimizes the block's squared error), so an outlier may lose that much.
    bound = rows / 254 + 1e-6 if scheme == "int8" else 0.4 * 2 * rows + rows / 15
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - want).mean() < (0.01 if scheme == "int8" else 0.12) * np.abs(want).mean()
    types = set(_initializer_types(onnx.load(str(path))).values())
    assert (onnx.TensorProto.INT8 if scheme == "int8" else onnx.TensorProto.UINT8) in types
    assert onnx.TensorProto.FLOAT not in {t for n, t in _initializer_types(onnx.load(str(path))).items() if "scale" not in n}
