"""Integer weights for an exported decoder graph, with ONNX Runtime's own quantization tools.

1. int8: every MatMul with a constant weight (projections, MLP, lm_head) gets int8 per-channel
   weights and uint8 activations quantized at run time (`quantize_dynamic`, per_channel): ORT
   fuses the result into `DynamicQuantizeMatMul` / `MatMulIntegerToFloat` kernels.
2. int4: the same MatMuls become `com.microsoft::MatMulNBits` (bits=4, `block_size` weights per
   scale, round-to-nearest) with fp32 activations.

Gemm / FusedMatMul / Transpose+MatMul weight products are first rewritten to plain MatMul with
an [in, out] initializer (`weights_as_matmul`), because ORT's quantizers only rewrite MatMul.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import onnx

logger = logging.getLogger(__name__)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def weights_as_matmul(model: onnx.ModelProto) -> int:
    """Rewrite weight products into plain `MatMul(x, W[in, out])`, in place; returns the count.

    The dynamic quantizer only understands MatMul with a constant [in, out] weight, while the
    exporter and the fusions also produce, for Linear/Conv1D weights:
    1. `Gemm(x, W[, C])` (alpha = beta = 1, transA = 0) -> `MatMul(x, W or W^T)` (+ `Add(C)`);
    2. `FusedMatMul(x, W)` with only transB = 1 (lm_head) -> `MatMul(x, W^T)`;
    3. `MatMul(x, Transpose(W))` of a 2-D initializer -> `MatMul(x, W^T)`.
    A transposed copy becomes a new initializer; the original stays if anything else reads it
    (a tied embedding table).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer if len(i.dims) == 2}
    transposed: dict[str, str] = {}

    def weight_t(name: str) -> str:
        if name not in transposed:
            array = numpy_helper.to_array(inits[name]).T.copy()
            new = name + "_T"
            graph.initializer.append(numpy_helper.from_array(array, new))
            transposed[name] = new
        return transposed[name]

    transpose_of = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in inits and list(_attrs(n).get("perm", [1, 0])) == [1, 0]
    }
    rewritten = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = _attrs(node)
        if (
            node.op_type == "Gemm"
            and node.input[1] in inits
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and not attrs.get("transA", 0)
        ):
            weight = weight_t(node.input[1]) if attrs.get("transB", 0) else node.input[1]
            has_bias = len(node.input) > 2 and node.input[2]
            product = node.output[0] + "_matmul" if has_bias else node.output[0]
            nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name + "_matmul"))
            if has_bias:
                nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        elif (
            node.op_type == "FusedMatMul"
            and node.input[1] in inits
            and attrs.get("transB", 0) == 1
            and attrs.get("alpha", 1.0) == 1.0
            and not any(attrs.get(k, 0) for k in ("transA", "transBatchA", "transBatchB"))
        ):
            nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight_t(node.input[1])], list(node.output), name=node.name))
        elif node.op_type == "MatMul" and node.input[1] in transpose_of:
            nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight_t(transpose_of[node.input[1]])], list(node.output), name=node.name))
        else:
            nodes.append(node)
            continue
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(model)
    return rewritten


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody reads, then initializers nobody reads."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraphs read outer values too
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else []:
                    needed.update(i for n in sub.node for i in n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose second input is a 2-D initializer (a weight)."""
    weights = {init.name for init in model.graph.initializer if len(init.dims) == 2}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_int8(src: Path, dst: Path, cpu: str = "auto") -> None:
    """ORT's `quantize_dynamic`, with 7-bit weights (`reduce_range`) where the target's sums saturate."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from planc.passes.cpu import int8_format

    nodes = _weight_matmuls(onnx.load(src, load_external_data=False))
    if not nodes:
        raise ValueError(f"{src} has no MatMul with a constant weight to quantize")
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        per_channel=True,
        weight_type=QuantType.QInt8,
        reduce_range=int8_format(cpu).arithmetic == "u8s8_sat16",
        extra_options={"MatMulConstBOnly": True},
    )


def quantize_int4(src: Path, dst: Path, block_size: int, symmetric: bool = True) -> None:
    from planc.backends.onnx.lowering import INT4_ACCURACY_LEVEL

    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(src)
    # accuracy level 4: int8 activations inside the kernel, as planc's own int4 lowering does
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=INT4_ACCURACY_LEVEL, op_types_to_quantize=("MatMul",)
    )
    quantizer = MatMulNBitsQuantizer(
        model, block_size=block_size, is_symmetric=symmetric, accuracy_level=INT4_ACCURACY_LEVEL,
        algo_config=config, nodes_to_include=_weight_matmuls(model),
    )
    quantizer.process()
    onnx.save(quantizer.model.model, dst)


def quantize_decoder(src: str | Path, dst: str | Path, scheme: str, *, group_size: int = 32, cpu: str = "auto") -> dict[str, int]:
    """Quantize the weight MatMuls of the graph at `src` into `dst` (may be the same path).

    Returns the op counts of the result (e.g. MatMulInteger / MatMulNBits) for the report.
    """
    if scheme not in ("int8", "int4"):
        raise ValueError(f"decoder quantization scheme must be 'int8' or 'int4', got {scheme!r}")
    from planc.compiler.publish import copy_file

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged.onnx"
        out = Path(tmp) / "quantized.onnx"
        model = onnx.load(src)
        logger.info("%d weight products rewritten as MatMul for quantization", weights_as_matmul(model))
        onnx.save(model, staged)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # ORT's quantizers log routine advice on the root logger
        try:
            if scheme == "int8":
                quantize_int8(staged, out, cpu)
            else:
                quantize_int4(staged, out, group_size)
        finally:
            logging.disable(previous)
        quantized = onnx.load(out)
        copy_file(out, dst)
    ops = Counter(n.op_type for n in quantized.graph.node)
    logger.info("quantized decoder (%s): %s", scheme, dict(ops))
    return dict(ops)
