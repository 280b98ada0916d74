"""ONNX lowerings of planc's quantized ops, used as the dynamo exporter's `custom_translation_table`.

Each `torch.ops.planc.*` op (see `passes/qops.py`) becomes a small ONNX subgraph that keeps the
integer weights as integer initializers and that ONNX Runtime's transformer fusions can still
see through (`optimize.py` then turns them into ONNX Runtime's integer kernels):

1. `linear_int8_dynamic(x, qweight, w_scale, bias)` ->
   `MatMul(x, DequantizeLinear(qweight^T, w_scale, axis=1)) [+ bias]`. A weight-only
   DequantizeLinear on a float activation is the marker of a dynamically quantized linear: planc
   has no weight-only int8 op, and `optimize.lower_int8` rewrites every such MatMul into
   `DynamicQuantizeMatMul` / `QAttention`, whose numerics are those of the planc op.
2. `linear_int8_static(x, x_scale, x_zero_point, ...)` -> standard QDQ:
   `MatMul(DequantizeLinear(QuantizeLinear(x, s, zp)), DequantizeLinear(qweight^T)) [+ bias]`.
3. `linear_int4(x, packed, scales, zero_points, K, group_size, bias)` ->
   `com.microsoft::MatMulNBits(x, packed, scales, zero_points, bits=4, block_size, K, N) [+ bias]`
   (planc's packing is exactly MatMulNBits' layout).
4. `embedding_int8(ids, qweight, scale)` -> `Gather(qweight, ids)` cast to float times
   `Gather(scale, ids)`.

The transposes of integer weights are folded into initializers by the exporter's optimizer.
Biases stay separate `Add`s so that fusions (SkipLayerNormalization, BiasGelu, Attention) can
absorb them as they absorb fp32 biases.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import onnx
import onnx_ir as ir
import onnxscript
from onnxscript import opset18 as op

MS_DOMAIN = "com.microsoft"
_msft = onnxscript.values.Opset(MS_DOMAIN, 1)

#: `MatMulNBits.accuracy_level`: 0 keeps the activation product in fp32, exactly the planc op's
#: numerics. Level 4 (int8 activations inside the kernel) measured no faster for MiniLM at
#: batch 1, seq 128 on 2 AVX-512 VNNI cores (42.7 vs 49.2 ms), and it costs accuracy.
INT4_ACCURACY_LEVEL = 0


@functools.cache
def ort_contrib_op(name: str) -> onnxscript.values.Op:
    """An onnxscript op of ONNX Runtime's `com.microsoft` domain, its schema mirrored from ORT.

    onnx ships no schemas for ORT's contrib ops, and onnxscript needs one to build a node.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    found = [s for s in ort_c.get_all_operator_schema() if s.name == name and s.domain == MS_DOMAIN]
    if not found:
        raise ValueError(f"this onnxruntime build has no com.microsoft::{name} operator")
    ort_schema = max(found, key=lambda s: s.since_version)
    OpSchema = onnx.defs.OpSchema

    def parameter(p: Any) -> OpSchema.FormalParameter:
        option = getattr(OpSchema.FormalParameterOption, p.option.name)
        return OpSchema.FormalParameter(p.name, p.typeStr, param_option=option)

    schema = OpSchema(
        name,
        MS_DOMAIN,
        ort_schema.since_version,
        inputs=[parameter(p) for p in ort_schema.inputs],
        outputs=[parameter(p) for p in ort_schema.outputs],
        type_constraints=[
            (t.type_param_str, list(t.allowed_type_strs), "") for t in ort_schema.type_constraints
        ],
        attributes=[
            OpSchema.Attribute(a.name, getattr(OpSchema.AttrType, a.type.name), required=a.required)
            for a in ort_schema.attributes.values()
        ],
    )
    return onnxscript.values.Op(_msft, name, schema)


def _static_dim(value: Any, axis: int) -> int:
    shape = getattr(value, "shape", None)
    if shape is None or not isinstance(shape[axis], int):
        raise ValueError(f"quantized weight {getattr(value, 'name', value)!r} needs a static shape to be exported")
    return int(shape[axis])


def _weight_scale(w_scale: Any, n_out: int) -> tuple[Any, dict[str, int]]:
    """(scale, DequantizeLinear attributes): per-channel on axis 1, or one scalar scale."""
    if n_out != 1 and _static_dim(w_scale, 0) == 1:
        return op.Squeeze(w_scale, op.Constant(value_ints=[0])), {}
    return w_scale, {"axis": 1}


def _dequantized_weight_t(qweight: Any, w_scale: Any) -> Any:
    """float W^T [in, out] from int8 W [out, in]: DequantizeLinear of the transposed integers."""
    scale, attrs = _weight_scale(w_scale, _static_dim(qweight, 0))
    return op.DequantizeLinear(op.Transpose(qweight, perm=[1, 0]), scale, **attrs)


def _add_bias(y: Any, bias: Any | None) -> Any:
    return y if bias is None else op.Add(y, bias)


def linear_int8_dynamic(x: Any, qweight: Any, w_scale: Any, bias: Any | None = None, saturate: bool = False) -> Any:
    # `saturate` models the target CPU's kernel in planc's reference op; ORT's kernel *is* it.
    return _add_bias(op.MatMul(x, _dequantized_weight_t(qweight, w_scale)), bias)


def linear_int8_static(
    x: Any,
    x_scale: float,
    x_zero_point: int,
    qweight: Any,
    w_scale: Any,
    bias: Any | None = None,
    saturate: bool = False,
) -> Any:
    scale = op.Constant(value=ir.tensor(float(x_scale), dtype=ir.DataType.FLOAT))
    zero_point = op.Constant(value=ir.tensor(int(x_zero_point), dtype=ir.DataType.UINT8))
    x_dq = op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)
    return _add_bias(op.MatMul(x_dq, _dequantized_weight_t(qweight, w_scale)), bias)


def linear_int4(
    x: Any,
    packed: Any,
    scales: Any,
    zero_points: Any | None = None,
    in_features: int = 0,
    group_size: int = 32,
    bias: Any | None = None,
) -> Any:
    n_out = _static_dim(packed, 0)
    y = ort_contrib_op("MatMulNBits")(
        x,
        packed,
        scales,
        zero_points,
        bits=4,
        block_size=int(group_size),
        K=int(in_features),
        N=n_out,
        accuracy_level=INT4_ACCURACY_LEVEL,
    )
    return _add_bias(y, bias)


def embedding_int8(ids: Any, qweight: Any, scale: Any) -> Any:
    rows = op.Cast(op.Gather(qweight, ids, axis=0), to=ir.DataType.FLOAT)
    row_scale = op.Unsqueeze(op.Gather(scale, ids, axis=0), op.Constant(value_ints=[-1]))
    return op.Mul(rows, row_scale)


def translation_table() -> dict[Callable, Callable]:
    """`torch.onnx.export(custom_translation_table=...)` for every planc op."""
    import torch

    import planc.passes.cluster.ops  # noqa: F401  (registers torch.ops.planc.linear_clustered)
    import planc.passes.qops  # noqa: F401  (registers torch.ops.planc.*)
    from planc.backends.onnx.cluster_lowering import linear_clustered

    planc = torch.ops.planc
    return {
        planc.linear_clustered.default: linear_clustered,
        planc.linear_int8_dynamic.default: linear_int8_dynamic,
        planc.linear_int8_static.default: linear_int8_static,
        planc.linear_int4.default: linear_int4,
        planc.embedding_int8.default: embedding_int8,
    }
