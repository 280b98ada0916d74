"""ONNX-level optimization of an exported planc graph for ONNX Runtime.

Runs on the in-memory `onnx_ir` model produced by `export.py`, in this order:

1. Transformer fusions (`onnxscript.rewriter.ort_fusions.optimize_for_ort`): Attention,
   SkipLayerNormalization, BiasGelu, ... They see through the `DequantizeLinear` weights that
   `lowering.py` emits for planc's int8 linears, so a fused `Attention` may carry int8 weights.
2. Integer kernels (`lower_int8`), using exactly the int8 weights and scales of the planc
   quantize pass (nothing is requantized, no other layer is touched):
   a. `Attention(x, Concat(DQ(Wq), DQ(Wk), DQ(Wv)))` -> `QAttention(DynamicQuantizeLinear(x), Wqkv)`
      when its additive attention bias is the padding (or padding+causal) mask of the
      `attention_mask` input, which a small probe run checks; otherwise one
      `DynamicQuantizeMatMul` for q|k|v feeding `MultiHeadAttention`.
   b. `MatMul(x, DQ(W)) [+ bias]` -> `DynamicQuantizeMatMul(x, W, scale, bias)`.
   c. the static forms `MatMul(DQ(Q(x)), DQ(W))` -> `MatMulIntegerToFloat` / `QAttention` with the
      calibrated input scale.
3. Embedding tables (`quantize_embeddings`, only when the target asks for it): a float
   `Gather(table, ids)` becomes int8 rows + per-row scales, or int4 `GatherBlockQuantized`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planc.backends.onnx.lowering import MS_DOMAIN

logger = logging.getLogger(__name__)

#: Only Gather tables with at least this many elements count as embedding tables worth
#: quantizing (word and position tables, not a two-row token-type table).
MIN_EMBEDDING_ELEMENTS = 1 << 16

MaskKind = Literal["padding", "causal"]


@dataclass
class GraphReport:
    """What the ONNX-level optimization did, for the artifact report."""

    fusions: dict[str, int] = field(default_factory=dict)
    lowered: dict[str, int] = field(default_factory=dict)
    embeddings: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"fusions": self.fusions, "lowered": self.lowered, "embeddings": self.embeddings}


# ----------------------------------------------------------------------------- small helpers


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _is_op(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain in ((domain,) if domain else ("", "ai.onnx"))


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer with a name not yet used in the graph."""
    base, suffix = name, 0
    while name in graph.initializers:
        suffix += 1
        name = f"{base}_{suffix}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, old_nodes: list[ir.Node], new_nodes: list[ir.Node], old: list[ir.Value], new: list[ir.Value]) -> None:
    ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, new_nodes, old, new)


@dataclass
class IntWeight:
    """An int8 weight [K, N] of a `DequantizeLinear`, with its per-column scales [N]."""

    data: ir.Value
    scale: ir.Value
    q: np.ndarray
    scales: np.ndarray


def int8_weight(value: ir.Value | None) -> IntWeight | None:
    """The weight behind `DequantizeLinear(int8 W[K, N], scale [N] or scalar, axis=1)`, if any."""
    node = value.producer() if value is not None else None
    if not _is_op(node, "DequantizeLinear"):
        return None
    q, scale, zero_point = _const(node.inputs[0]), _const(node.inputs[1]), _const(_input(node, 2))
    if q is None or scale is None or q.dtype != np.int8 or q.ndim != 2:
        return None
    if zero_point is not None and np.any(zero_point != 0):
        return None
    n = q.shape[1]
    if scale.size == 1:
        scales = np.full(n, float(scale.reshape(-1)[0]), dtype=np.float32)
    elif scale.shape == (n,) and node.attributes.get_int("axis", 1) in (1, -1):
        scales = scale.astype(np.float32)
    else:
        return None
    return IntWeight(node.inputs[0], node.inputs[1], q, scales)


@dataclass
class StaticInput:
    """`DequantizeLinear(QuantizeLinear(x, s, zp), s, zp)`: a statically quantized activation."""

    quantized: ir.Value
    scale: ir.Value
    zero_point: ir.Value


def static_input(value: ir.Value) -> StaticInput | None:
    dq = value.producer()
    if not _is_op(dq, "DequantizeLinear") or len(dq.inputs) < 3:
        return None
    q = dq.inputs[0].producer()
    if not _is_op(q, "QuantizeLinear"):
        return None
    scale, zero_point = _const(dq.inputs[1]), _const(dq.inputs[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.dtype != np.uint8:
        return None
    return StaticInput(dq.inputs[0], dq.inputs[1], dq.inputs[2])


# ----------------------------------------------------------------------------- 1. fusions


def apply_fusions(model: ir.Model) -> dict[str, int]:
    """ONNX Runtime transformer fusions, in place; returns the count of each fusion applied."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, counts = optimize_for_ort(model)
    return {name: count for name, count in counts.items() if count}


# ----------------------------------------------------------------------------- 2. int8 kernels


def _subgraph_proto(model: ir.Model, output: ir.Value) -> tuple[onnx.ModelProto, list[ir.Value]]:
    """A standalone model computing `output` from the graph inputs it depends on."""
    needed_nodes: set[int] = set()
    needed_values: list[ir.Value] = []
    stack = [output]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        needed_values.append(value)
        producer = value.producer()
        if producer is not None and id(producer) not in needed_nodes:
            needed_nodes.add(id(producer))
            stack.extend(v for v in producer.inputs if v is not None)
    graph = model.graph
    nodes = [ir.serde.serialize_node(n) for n in graph if id(n) in needed_nodes]
    inputs = [v for v in graph.inputs if id(v) in seen]
    initializers = []
    for value in needed_values:
        if value.is_initializer() and value.const_value is not None:
            tensor = ir.serde.serialize_tensor(value.const_value)
            tensor.name = value.name
            initializers.append(tensor)
    proto_graph = onnx.helper.make_graph(
        nodes,
        "probe",
        [ir.serde.serialize_value(v) for v in inputs],
        [onnx.helper.make_tensor_value_info(output.name, onnx.TensorProto.FLOAT, None)],
        initializers,
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in graph.opset_imports.items()]
    return onnx.helper.make_model(proto_graph, opset_imports=opsets, ir_version=model.ir_version), inputs


def probe_mask_kind(model: ir.Model, bias: ir.Value) -> tuple[MaskKind, ir.Value] | None:
    """Is `bias` (an additive attention bias) the padding mask of an `*mask*` input, maybe causal?

    Runs the bias's subgraph on a half-padded batch and compares it to the two patterns.
    Returns the kind and the mask input, or None when it is anything else.
    """
    import onnxruntime as ort

    try:
        proto, inputs = _subgraph_proto(model, bias)
    except Exception as error:  # noqa: BLE001 - an unprobeable bias just keeps the generic path
        logger.debug("attention bias %s cannot be extracted: %s", bias.name, error)
        return None
    masks = [v for v in inputs if v.name and "mask" in v.name.lower()]
    if len(masks) != 1:
        return None
    mask_input = masks[0]
    shape = mask_input.shape
    if shape is None or len(shape) != 2:
        return None
    batch = shape[0] if isinstance(shape[0], int) else 2
    seq = shape[1] if isinstance(shape[1], int) else 6
    if seq < 2:
        return None
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[-1, (seq + 1) // 2 :] = 0
    feeds = {}
    for value in inputs:
        dtype = ir.DataType(value.dtype).numpy() if value.dtype is not None else np.int64
        if value is mask_input:
            feeds[value.name] = mask.astype(dtype)
            continue
        dims = [d if isinstance(d, int) else (batch if axis == 0 else seq) for axis, d in enumerate(value.shape or ())]
        feeds[value.name] = np.zeros(dims, dtype=dtype)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = np.asarray(session.run(None, feeds)[0], dtype=np.float32)
    except Exception as error:  # noqa: BLE001
        logger.debug("attention bias probe failed: %s", error)
        return None
    if out.ndim != 4:
        return None
    try:
        out = np.broadcast_to(out, (batch, out.shape[1], seq, seq))
    except ValueError:
        return None
    if not np.all(out == out[:, :1]):
        return None
    out = out[:, 0]
    kept, masked = np.abs(out) < 1e-6, out <= -1e4
    if not np.all(kept | masked):
        return None
    padding = np.broadcast_to(mask[:, None, :].astype(bool), (batch, seq, seq))
    causal = padding & np.tril(np.ones((seq, seq), dtype=bool))[None]
    if np.array_equal(kept, padding):
        return "padding", mask_input
    if np.array_equal(kept, causal):
        return "causal", mask_input
    return None


class _Int8Lowering:
    """State of one `lower_int8` run: shared mask casts and activation quantizations."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.counts: Counter[str] = Counter()
        self._mask_kinds: dict[int, tuple[MaskKind, ir.Value] | None] = {}
        self._mask_index: dict[int, ir.Value] = {}

    # -- shared values

    def mask_kind(self, bias: ir.Value) -> tuple[MaskKind, ir.Value] | None:
        if id(bias) not in self._mask_kinds:
            self._mask_kinds[id(bias)] = probe_mask_kind(self.model, bias)
        return self._mask_kinds[id(bias)]

    def mask_index(self, mask_input: ir.Value) -> ir.Value:
        """`Cast(mask, int32)`, created once at the top of the graph."""
        if id(mask_input) not in self._mask_index:
            cast = ir.node("Cast", [mask_input], {"to": ir.DataType.INT32}, name=f"{mask_input.name}_int32")
            cast.outputs[0].name = f"{mask_input.name}_int32"
            self.graph.insert_before(self.graph.node(0), cast)
            self._mask_index[id(mask_input)] = cast.outputs[0]
        return self._mask_index[id(mask_input)]

    # -- rewrites

    def integer_matmul(self, x: ir.Value, weight: ir.Value, scale: ir.Value, bias: ir.Value | None, name: str) -> ir.Node:
        """`x @ dequant(weight) + bias` as one ORT integer kernel (dynamic or static activation)."""
        static = static_input(x)
        if static is not None:
            self.counts["MatMulIntegerToFloat"] += 1
            inputs = [static.quantized, weight, static.scale, scale, static.zero_point, None, bias]
            return ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=name)
        self.counts["DynamicQuantizeMatMul"] += 1
        return ir.node("DynamicQuantizeMatMul", [x, weight, scale, None, bias], domain=MS_DOMAIN, name=name)

    def lower_matmul(self, node: ir.Node) -> None:
        weight = int8_weight(node.inputs[1])
        if weight is None:
            return
        old_nodes, out = [node], node.outputs[0]
        bias = None
        users = out.uses()
        if len(users) == 1 and not out.is_graph_output():
            add = users[0].node
            other = add.inputs[1 - users[0].idx] if len(add.inputs) == 2 else None
            b = _const(other)
            if _is_op(add, "Add") and b is not None and b.shape == (weight.q.shape[1],) and b.dtype == np.float32:
                bias, old_nodes, out = other, [node, add], add.outputs[0]
        new = self.integer_matmul(node.inputs[0], weight.data, weight.scale, bias, node.name or "matmul_int8")
        _replace(self.graph, old_nodes, [new], [out], [new.outputs[0]])

    def lower_attention(self, node: ir.Node) -> None:
        concat = node.inputs[1].producer() if node.inputs[1] is not None else None
        if not _is_op(concat, "Concat") or concat.attributes.get_int("axis", 0) not in (1, -1):
            return
        weights = [int8_weight(v) for v in concat.inputs]
        if not weights or any(w is None for w in weights):
            return
        name = node.name or "attention"
        if any(_input(node, i) is not None for i in (4, 6)):
            logger.warning("attention %s has a past state: its int8 weights stay dequantized", name)
            return
        x, bias, mask_index, attention_bias = node.inputs[0], _input(node, 2), _input(node, 3), _input(node, 5)
        sizes = list(node.attributes.get_ints("qkv_hidden_sizes", []) or [])
        unidirectional = node.attributes.get_int("unidirectional", 0)
        if attention_bias is not None and mask_index is None:
            kind = self.mask_kind(attention_bias)
            if kind is not None:
                mask_index, attention_bias = self.mask_index(kind[1]), None
                unidirectional = int(kind[0] == "causal")
        use_qattention = attention_bias is None and len(set(sizes)) <= 1
        if not use_qattention and mask_index is not None:
            logger.warning("attention %s: unsupported mask; its int8 weights stay dequantized", name)
            return

        w = np.concatenate([wt.q for wt in weights], axis=1)
        w_value = _initializer(self.graph, f"{name}_qkv_weight_int8", w)
        s_value = _initializer(self.graph, f"{name}_qkv_weight_scale", np.concatenate([wt.scales for wt in weights]))
        if bias is None:
            bias = _initializer(self.graph, f"{name}_qkv_bias", np.zeros(w.shape[1], np.float32))
        attrs = {
            "num_heads": node.attributes.get_int("num_heads"),
            "unidirectional": unidirectional,
            **{k: node.attributes[k].value for k in ("scale", "mask_filter_value") if k in node.attributes},
        }
        if use_qattention:
            new_nodes = self._qattention(x, w_value, bias, s_value, mask_index, attrs, name)
        else:
            sizes = sizes or [w.shape[1] // 3] * 3
            new_nodes = self._split_mha(x, w_value, s_value, bias, sizes, attention_bias, attrs, name)
        _replace(self.graph, [node], new_nodes, [node.outputs[0]], [new_nodes[-1].outputs[0]])

    def _qattention(self, x, w, bias, scale, mask_index, attrs, name) -> list[ir.Node]:
        """`QAttention` on x quantized at run time (or by its calibrated QuantizeLinear)."""
        static = static_input(x)
        nodes: list[ir.Node] = []
        if static is not None:
            xq, xs, xz = static.quantized, static.scale, static.zero_point
        else:
            quant = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{name}_quantize_input")
            nodes.append(quant)
            xq, xs, xz = quant.outputs
        nodes.append(ir.node("QAttention", [xq, w, bias, xs, scale, mask_index, xz], attrs, domain=MS_DOMAIN, name=name))
        self.counts["QAttention"] += 1
        return nodes

    def _split_mha(self, x, w, scale, bias, sizes, attention_bias, attrs, name) -> list[ir.Node]:
        """One integer matmul for q|k|v, split, then `MultiHeadAttention` with the additive bias."""
        project = self.integer_matmul(x, w, scale, bias, f"{name}_qkv")
        split_sizes = _initializer(self.graph, f"{name}_qkv_split", np.array(sizes, dtype=np.int64))
        split = ir.node("Split", [project.outputs[0], split_sizes], {"axis": -1}, num_outputs=3, name=f"{name}_split")
        q, k, v = split.outputs
        mha = ir.node("MultiHeadAttention", [q, k, v, None, None, attention_bias], attrs, domain=MS_DOMAIN, name=name)
        self.counts["MultiHeadAttention"] += 1
        return [project, split, mha]


def lower_int8(model: ir.Model) -> dict[str, int]:
    """Rewrite every int8-weight matmul/attention into ORT integer kernels; returns op counts."""
    lowering = _Int8Lowering(model)
    for node in list(model.graph):
        if node.op_type == "Attention" and node.domain == MS_DOMAIN:
            lowering.lower_attention(node)
    for node in list(model.graph):
        if _is_op(node, "MatMul") and node.graph is not None:
            lowering.lower_matmul(node)
    if lowering.counts:
        model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
    RemoveUnusedNodesPass()(model)
    leftover = [n.name for n in model.graph if int8_weight(n.outputs[0]) is not None]
    if leftover:
        logger.warning(
            "%d int8 weights feed ops without an integer kernel and stay dequantized: %s",
            len(leftover),
            ", ".join(leftover[:5]),
        )
    return dict(lowering.counts)


# ----------------------------------------------------------------------------- 3. embeddings


#: Clipping ratios tried per int4 embedding block; the one with the least squared error wins.
_INT4_CLIP_RATIOS = np.linspace(0.6, 1.0, 9)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two per byte, the even element in the low nibble."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _int4_blocks(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int4 per block of `block_size` columns in GatherBlockQuantized's layout.

    Each block's [min, max] range (widened to include 0) is shrunk by the clipping ratio that
    minimizes the block's squared error. Scales are fp16 (half the bytes of fp32 for a table
    this size); the integers are computed against the rounded fp16 scale.
    Returns (packed data uint8 [rows, cols/2], scales fp16 [rows, blocks], packed zero points
    uint8 [rows, ceil(blocks/2)]).
    """
    rows, cols = table.shape
    blocks = table.reshape(rows, cols // block_size, block_size).astype(np.float32)
    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    best_error = np.full(lo.shape, np.inf, dtype=np.float32)
    best_scale = np.ones(lo.shape, dtype=np.float16)
    best_zero = np.zeros(lo.shape, dtype=np.uint8)
    for ratio in _INT4_CLIP_RATIOS:
        scale = ((hi - lo) * ratio / 15.0).astype(np.float16)
        scale = np.where(scale > 0, scale, np.float16(1.0))
        scale32 = scale.astype(np.float32)
        zero = np.clip(np.round(-lo * ratio / scale32), 0, 15)
        q = np.clip(np.round(blocks / scale32[..., None]) + zero[..., None], 0, 15)
        error = (((q - zero[..., None]) * scale32[..., None] - blocks) ** 2).sum(axis=2)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero.astype(np.uint8), best_zero)
    scale32 = best_scale.astype(np.float32)
    q = np.clip(np.round(blocks / scale32[..., None]) + best_zero[..., None], 0, 15).astype(np.uint8)
    return _pack_nibbles(q.reshape(rows, cols)), best_scale, _pack_nibbles(best_zero)


def quantize_embeddings(model: ir.Model, scheme: Literal["int8", "int4"], block_size: int = 32) -> dict[str, str]:
    """Store every large float `Gather(table, ids)` table as int8 rows or int4 blocks, in place.

    With `int4`, token tables (indexed by a graph input) become int4 blocks, other tables
    (positions) int8 rows.
    Tables read by anything but Gathers (tied output projections) are left alone: quantizing
    them would keep a second, fp32 copy. Returns {table name: storage} for the report.
    """
    graph = model.graph
    done: dict[str, str] = {}
    for node in list(graph):
        if not _is_op(node, "Gather") or node.attributes.get_int("axis", 0) != 0:
            continue
        table_value, ids = node.inputs[0], node.inputs[1]
        table = _const(table_value) if table_value is not None and table_value.is_initializer() else None
        if table is None or table.dtype != np.float32 or table.ndim != 2 or table.size < MIN_EMBEDDING_ELEMENTS:
            continue
        if any(not _is_op(use.node, "Gather") for use in table_value.uses()):
            continue
        name = table_value.name
        out = node.outputs[0]
        # int4 only for token tables (indexed by a graph input): a position table's error is
        # added to every token, and the table is small.
        if scheme == "int4" and ids.is_graph_input() and table.shape[1] % block_size == 0:
            packed, scales, zeros = _int4_blocks(table, block_size)
            data = _initializer(graph, f"{name}_int4", packed)
            scale = _initializer(graph, f"{name}_int4_scale", scales)
            zero = _initializer(graph, f"{name}_int4_zero_point", zeros)
            attrs = {"bits": 4, "block_size": block_size, "gather_axis": 0, "quantize_axis": 1}
            gather = ir.node("GatherBlockQuantized", [data, ids, scale, zero], attrs, domain=MS_DOMAIN, name=f"{name}_gather")
            as_float = ir.node("Cast", [gather.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_cast")
            new_nodes = [gather, as_float]
            done[name] = f"int4 asymmetric, blocks of {block_size}, fp16 scales"
        else:
            amax = np.abs(table).max(axis=1)
            row_scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.round(table / row_scale[:, None]), -127, 127).astype(np.int8)
            data = _initializer(graph, f"{name}_int8", q)
            scale = _initializer(graph, f"{name}_int8_scale", row_scale)
            rows = ir.node("Gather", [data, ids], {"axis": 0}, name=f"{name}_gather")
            as_float = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_cast")
            scales = ir.node("Gather", [scale, ids], {"axis": 0}, name=f"{name}_gather_scale")
            axes = _initializer(graph, f"{name}_unsqueeze_axes", np.array([-1], dtype=np.int64))
            column = ir.node("Unsqueeze", [scales.outputs[0], axes], name=f"{name}_scale_column")
            mul = ir.node("Mul", [as_float.outputs[0], column.outputs[0]], name=f"{name}_dequantize")
            new_nodes = [rows, as_float, scales, column, mul]
            done[name] = "int8 rows"
        if scheme == "int4" and ids.is_graph_input() and table.shape[1] % block_size:
            logger.warning("embedding %s: width %d is not a multiple of %d, stored as int8", name, table.shape[1], block_size)
        _replace(graph, [node], new_nodes, [out], [new_nodes[-1].outputs[0]])
    if done:
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        RemoveUnusedNodesPass()(model)
    return done


# ----------------------------------------------------------------------------- all together


def optimize_graph(
    model: ir.Model,
    *,
    fusions: bool,
    embeddings: Literal["int8", "int4"] | None = None,
    embedding_block: int = 32,
) -> GraphReport:
    """Run the three stages of the module docstring on `model`, in place."""
    report = GraphReport()
    if fusions:
        try:
            report.fusions = apply_fusions(model)
        except Exception as error:  # noqa: BLE001 - an unfusable graph is still a valid graph
            logger.warning("ONNX Runtime fusions failed, continuing unfused: %s: %s", type(error).__name__, error)
    report.lowered = lower_int8(model)
    if embeddings is not None:
        report.embeddings = quantize_embeddings(model, embeddings, embedding_block)
    return report
