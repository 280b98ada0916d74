"""The planc quantized ops against ONNX Runtime's own operators and the analytic bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import planc.passes.qops as qops
from planc.passes.cpu import FORMATS, cpu_of, int8_format, portable

#: Whether ONNX Runtime's u8 x s8 kernels saturate on the CPU running this test (read, not assumed).
HOST_SATURATES = int8_format("auto").arithmetic == "u8s8_sat16"

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _run(nodes, inputs, initializers, opset_ms: bool = False) -> np.ndarray:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)) for name, arr in inputs.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(arr, name) for name, arr in initializers.items()],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if opset_ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["Y"], inputs)[0]


@pytest.fixture()
def data():
    torch.manual_seed(0)
    return torch.randn(48, 100), torch.randn(48), torch.randn(7, 100) * 2 + 0.3


def test_int8_dynamic_matches_onnxruntime(data):
    w, b, x = data
    q, scale = qops.quantize_per_channel_int8(w)
    ours = torch.ops.planc.linear_int8_dynamic(x, q, scale, b, HOST_SATURATES).numpy()
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["X"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "WT", "xz", "wz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["y0"]),
        helper.make_node("Add", ["y0", "B"], ["Y"]),
    ]
    inits = {
        "WT": q.t().contiguous().numpy(),
        "wz": np.zeros(48, dtype=np.int8),
        "ws": scale.numpy(),
        "B": b.numpy(),
    }
    theirs = _run(nodes, {"X": x.numpy()}, inits)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # And both are close to the float linear.
    ref = torch.nn.functional.linear(x, w, b)
    assert float((torch.from_numpy(theirs) - ref).norm() / ref.norm()) < 0.02


def test_int8_static_matches_quantize_linear(data):
    w, b, x = data
    q, scale = qops.quantize_per_tensor_int8(w)
    x_scale, x_zp = qops.quantize_activation_params(float(x.min()), float(x.max()))
    ours = torch.ops.planc.linear_int8_static(x, x_scale, x_zp, q, scale, None, HOST_SATURATES).numpy()
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["xq"]),
        helper.make_node("MatMulInteger", ["xq", "WT", "xz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["Y"]),
    ]
    inits = {
        "xs": np.array(x_scale, dtype=np.float32),
        "xz": np.array(x_zp, dtype=np.uint8),
        "WT": q.t().contiguous().numpy(),
        "ws": scale.numpy(),
    }
    theirs = _run(nodes, {"X": x.numpy()}, inits)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_features,group", [(100, 32), (128, 16), (96, 64)])
def test_int4_matches_matmulnbits(data, symmetric, in_features, group):
    torch.manual_seed(1)
    w = torch.randn(48, in_features)
    b = torch.randn(48)
    x = torch.randn(5, in_features)
    packed, scales, zps = qops.pack_int4(w, group, symmetric)
    n_blocks = -(-in_features // group)
    assert packed.shape == (48, n_blocks, group // 2) and packed.dtype == torch.uint8
    assert scales.shape == (48 * n_blocks,)
    if not symmetric:
        assert zps.shape == (48 * -(-n_blocks // 2),) and zps.dtype == torch.uint8
    ours = torch.ops.planc.linear_int4(x, packed, scales, zps, in_features, group, b).numpy()
    inputs = ["A", "B", "scales"] + (["zp"] if zps is not None else [])
    nodes = [
        helper.make_node(
            "MatMulNBits", inputs, ["y0"], domain="com.microsoft", K=in_features, N=48, bits=4, block_size=group
        ),
        helper.make_node("Add", ["y0", "bias"], ["Y"]),
    ]
    inits = {"B": packed.numpy(), "scales": scales.numpy(), "bias": b.numpy()}
    if zps is not None:
        inits["zp"] = zps.numpy()
    theirs = _run(nodes, {"A": x.numpy()}, inits, opset_ms=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_dequant_error_within_half_scale(symmetric):
    torch.manual_seed(2)
    w = torch.randn(64, 200) * torch.rand(64, 1) * 3
    packed, scales, zps = qops.pack_int4(w, 32, symmetric)
    w_hat = qops.unpack_int4(packed, scales, zps, 200, 32)
    per_element_scale = scales.reshape(64, -1).repeat_interleave(32, dim=1)[:, :200]
    assert torch.all((w - w_hat).abs() <= per_element_scale / 2 * (1 + 1e-5) + 1e-7)


def test_int4_nibble_layout_by_hand():
    """Element k of a block sits in byte k // 2, even elements in the low nibble."""
    w = torch.tensor([[-7.0, -6.0, 1.0, 7.0] + [0.0] * 12])  # amax 7 -> scale 1, q = w + 8
    packed, scales, zps = qops.pack_int4(w, 16, symmetric=True)
    assert zps is None and torch.allclose(scales, torch.tensor([1.0]))
    assert packed[0, 0, 0].item() == (1 | (2 << 4))  # q = 1 (low), 2 (high)
    assert packed[0, 0, 1].item() == (9 | (15 << 4))


def test_embedding_int8_rows():
    torch.manual_seed(3)
    table = torch.randn(30, 8)
    q, scale = qops.quantize_per_channel_int8(table)
    ids = torch.tensor([[0, 5, 29], [3, 3, 1]])
    out = torch.ops.planc.embedding_int8(ids, q, scale)
    assert out.shape == (2, 3, 8)
    assert torch.all((out - table[ids]).abs() <= scale[ids].unsqueeze(-1) / 2 + 1e-7)


def test_ops_trace_with_dynamic_shapes():
    torch.manual_seed(4)
    q, scale = qops.quantize_per_channel_int8(torch.randn(16, 32))
    packed, scales, zps = qops.pack_int4(torch.randn(16, 32), 16, symmetric=False)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, value in dict(q=q, s=scale, p=packed, ps=scales, z=zps).items():
                self.register_buffer(name, value)

        def forward(self, x):
            a = torch.ops.planc.linear_int8_dynamic(x, self.q, self.s, None)
            b = torch.ops.planc.linear_int4(x, self.p, self.ps, self.z, 32, 16, None)
            return a + b

    x = torch.randn(2, 5, 32)
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}
    program = torch.export.export(Model(), (x,), dynamic_shapes=({**dims},), strict=False)
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.planc.linear_int8_dynamic.default in targets
    assert torch.ops.planc.linear_int4.default in targets
    y = program.module()(torch.randn(3, 9, 32))
    assert y.shape == (3, 9, 16)


# ----------------------------------------------------------------------------- target arithmetic


def _numpy_kernel(xq: np.ndarray, zp: int, w: np.ndarray, saturate: bool) -> np.ndarray:
    """The u8 x s8 kernel by hand: `acc = sum_{k even} sat16(a_k b_k + a_k+1 b_k+1) - zp sum_k b_k`."""
    a, b = xq.astype(np.int64), w.astype(np.int64)  # [M, K], [N, K]
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 0), (0, 1)))
    pairs = a[:, None, 0::2] * b[None, :, 0::2] + a[:, None, 1::2] * b[None, :, 1::2]  # [M, N, K/2]
    if saturate:
        pairs = np.clip(pairs, -32768, 32767)
    return pairs.sum(-1) - zp * b.sum(1)[None, :]


@pytest.fixture()
def saturating_case():
    """Activations near the top of uint8 and full-range weights whose pairs overflow int16."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.uniform(-0.2, 4.0, (6, 96)).astype(np.float32))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], (48, 1)) * rng.uniform(0.7, 1.0, (48, 96))).float()
    return x, w


@pytest.mark.parametrize("odd", [False, True])
def test_avx2_arithmetic_is_the_saturating_pair_sum(saturating_case, odd):
    x, w = saturating_case
    if odd:
        x, w = x[:, :95], w[:, :95]
    q, scale = qops.quantize_per_channel_int8(w)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    x_scale, x_zp = qops.quantize_activation_params(lo, hi)
    xq = torch.clamp(torch.round(x / x_scale) + x_zp, 0, 255)
    saturated = qops.integer_accumulate(xq, x_zp, q, saturate=True).numpy()
    exact = qops.integer_accumulate(xq, x_zp, q, saturate=False).numpy()
    np.testing.assert_array_equal(saturated, _numpy_kernel(xq.numpy(), x_zp, q.numpy(), saturate=True))
    np.testing.assert_array_equal(exact, _numpy_kernel(xq.numpy(), x_zp, q.numpy(), saturate=False))
    assert np.abs(saturated - exact).max() > 1000  # the case really overflows
    # The op reaches the same sums: static activations make its scales explicit.
    y = torch.ops.planc.linear_int8_static(x, x_scale, x_zp, q, scale, None, True)
    np.testing.assert_allclose(y.numpy(), saturated * x_scale * scale.numpy()[None, :], rtol=1e-5, atol=1e-3)


def test_seven_bit_weights_never_saturate(saturating_case):
    x, w = saturating_case
    fmt = FORMATS["x86_avx2"]
    q, scale = qops.quantize_per_channel_int8(w, fmt.weight_max)
    assert int(q.abs().max()) == fmt.weight_max == 63
    exact = torch.ops.planc.linear_int8_dynamic(x, q, scale, None, False)
    saturating = torch.ops.planc.linear_int8_dynamic(x, q, scale, None, True)
    torch.testing.assert_close(saturating, exact, rtol=0, atol=0)


def test_int4_keeps_float64_inputs_in_float64():
    """The mixed-precision search runs its graphs in float64: the int4 product must not drop to fp32."""
    torch.manual_seed(3)
    w, x, bias = torch.randn(16, 64), torch.randn(3, 64, dtype=torch.float64), torch.randn(16)
    packed, scales, zps = qops.pack_int4(w, 32, False)
    y = torch.ops.planc.linear_int4(x, packed, scales, zps, 64, 32, bias)
    exact = x @ qops.unpack_int4(packed, scales, zps, 64, 32).double().t() + bias.double()
    assert y.dtype == torch.float64 and torch.allclose(y, exact, rtol=1e-13, atol=1e-13)
    assert torch.ops.planc.linear_int4(x.float(), packed, scales, zps, 64, 32, bias).dtype == torch.float32


def test_portable_decisions_assume_the_least_exact_sums():
    """`auto` is scored as the family with the narrowest int8 weights, whichever machine compiles."""
    assert portable("auto") == "x86_avx2" and FORMATS[portable("auto")].weight_max == min(f.weight_max for f in FORMATS.values())
    assert portable("x86_vnni") == "x86_vnni" and portable("arm64") == "arm64"


def test_cpu_families_from_flags():
    assert cpu_of({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "x86_vnni"
    assert cpu_of({"avx2", "avx_vnni"}, "x86_64") == "x86_vnni"
    assert cpu_of({"avx2", "avx512f", "avx512bw"}, "x86_64") == "x86_avx2"
    assert cpu_of({"asimd", "asimddp"}, "aarch64") == "arm64"
    assert FORMATS["x86_vnni"].weight_max == 127 and FORMATS["x86_vnni"].arithmetic == "exact"
    assert FORMATS["x86_avx2"].arithmetic == "u8s8_sat16"


@pytest.mark.parametrize("case", ["random", "saturating"])
@pytest.mark.parametrize("cpu", ["x86_avx2", "x86_vnni"])
def test_each_targets_weights_match_onnxruntime_on_this_cpu(data, saturating_case, cpu, case):
    """Weights made for either target, run here by ORT, match the reference of THIS CPU."""
    w, b, x = data
    if case == "saturating":
        x, w = saturating_case
        b = torch.zeros(w.shape[0])
    q, scale = qops.quantize_per_channel_int8(w, FORMATS[cpu].weight_max)
    ours = torch.ops.planc.linear_int8_dynamic(x, q, scale, b, HOST_SATURATES).numpy()
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["X", "W", "ws", "", "B"], ["Y"], domain="com.microsoft")]
    theirs = _run(nodes, {"X": x.numpy()}, {"W": q.t().contiguous().numpy(), "ws": scale.numpy(), "B": b.numpy()}, opset_ms=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
