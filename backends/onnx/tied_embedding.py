"""A tied embedding read from the int4 LM head's own table (ONNX Runtime's `GatherBlockQuantized`).

Models that tie the token embedding to the output projection (Qwen2.5-0.5B, Llama-3.2-1B/3B,
GPT-2) store one table. After int4 quantization the exported graph holds it twice: the LM head's
`MatMulNBits` weights (4 bits) and the embedding `Gather`'s fp32 table (32 bits): for
Qwen2.5-0.5B that is 545 MB of fp32 beside 68 MB of int4. Rewrite:

    Gather(table fp32 [V, K], ids)
      -> Reshape(GatherBlockQuantized(B [V, K/bs, bs/2], ids, scales [V, K/bs, 1] (, zp)), [0, 0, K])

where B, the scales and the zero points are the LM head's (`MatMulNBits` dequantizes
`(q - zp) * scale` per block of `bs` inputs, `GatherBlockQuantized` the same per block of `bs`
elements of a row), so the embedding becomes exactly the LM head's dequantized table: tied, as
in the model, at 4 bits. The pair is recognised by value, not by name: the head's dequantized
weights must be the table up to int4 rounding. The artifact is verified after this rewrite like
any other step; a goal that the int4 embedding misses fails the compile.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planc.backends.onnx.lowering import MS_DOMAIN
from planc.backends.onnx.optimize import _const, _initializer, _is_op, _replace

logger = logging.getLogger(__name__)

#: Largest relative Frobenius error of the head's dequantized weights against the table for
#: the two to count as one tied table (int4 rounding gives ~0.1; unrelated tables ~1.4).
TIED_TOLERANCE = 0.25
#: Rows of the table compared at a time.
ROWS_PER_BLOCK = 8192


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes -> `count` 4-bit values along the last axis, the low nibble first."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :count]


def _dequantized(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, block: int) -> np.ndarray:
    """MatMulNBits' weights [N, K] as floats: B [N, K/bs, bs/2] packed, scales [N * K/bs]."""
    n, blocks = b.shape[0], b.shape[1]
    q = _unpack_nibbles(b, block).astype(np.float32)  # [N, blocks, bs]
    zero = (np.full((n, blocks), 8.0, np.float32) if zero_points is None
            else _unpack_nibbles(zero_points.reshape(n, -1), blocks).astype(np.float32))
    return ((q - zero[..., None]) * scales.reshape(n, blocks)[..., None]).reshape(n, -1)[:, :k]


def _tied_head(table: np.ndarray, heads: list[ir.Node]) -> ir.Node | None:
    """The int4 MatMulNBits among `heads` whose dequantized weights are `table`, if any."""
    rows, width = table.shape
    norm = float(np.linalg.norm(table)) or 1.0
    for node in heads:
        attrs = node.attributes
        if attrs.get_int("bits", 4) != 4 or attrs.get_int("N", 0) != rows or attrs.get_int("K", 0) != width:
            continue
        b, scales = _const(node.inputs[1]), _const(node.inputs[2])
        zero_points = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        block = attrs.get_int("block_size", 32)
        if b is None or scales is None or b.ndim != 3 or width % block or (len(node.inputs) > 3 and node.inputs[3] is not None and zero_points is None):
            continue
        squares = 0.0  # block by block over rows: bounded temporaries on a 128k-row table
        scales, zero_points = scales.reshape(rows, -1), None if zero_points is None else zero_points.reshape(rows, -1)
        for start in range(0, rows, ROWS_PER_BLOCK):
            end = start + ROWS_PER_BLOCK
            zero = None if zero_points is None else zero_points[start:end]
            squares += float(np.square(_dequantized(b[start:end], scales[start:end], zero, width, block) - table[start:end]).sum())
        if squares ** 0.5 / norm <= TIED_TOLERANCE:
            return node
    return None


def share_tied_embedding(model: ir.Model) -> str | None:
    """Replace a token embedding tied to an int4 LM head by a read of the head's table, in place.

    Returns the embedding's initializer name when rewritten, else None."""
    graph = model.graph
    heads = [node for node in graph if _is_op(node, "MatMulNBits", MS_DOMAIN)]
    if not heads:
        return None
    for node in list(graph):
        if not _is_op(node, "Gather") or node.attributes.get_int("axis", 0) != 0:
            continue
        table_value, ids = node.inputs[0], node.inputs[1]
        if table_value is None or ids is None or not table_value.is_initializer() or not ids.is_graph_input():
            continue
        if any(use.node is not node for use in table_value.uses()):
            continue  # the table is read elsewhere too: nothing would be saved
        if isinstance(table_value.const_value, ir.LazyTensor):
            continue  # still in the checkpoint: an untied table (a tied one is loaded, `compiler/model/deferred.py`)
        table = _const(table_value)
        if table is None or table.dtype != np.float32 or table.ndim != 2:
            continue
        head = _tied_head(table, heads)
        if head is None:
            continue
        block = head.attributes.get_int("block_size", 32)
        rows, width = table.shape
        name = table_value.name
        blocks = head.inputs[1].shape[1]  # type: ignore[union-attr,index]
        scale_shape = _initializer(graph, f"{name}_tied_scale_shape", np.array([rows, blocks, 1], np.int64))
        scales = ir.node("Reshape", [head.inputs[2], scale_shape], name=f"{name}_tied_scales")
        inputs = [head.inputs[1], ids, scales.outputs[0]]
        new_nodes = [scales]
        if len(head.inputs) > 3 and head.inputs[3] is not None:  # one zero point per byte in this layout
            zero = _unpack_nibbles(_const(head.inputs[3]).reshape(rows, -1), blocks).astype(np.uint8)  # type: ignore[union-attr]
            inputs.append(_initializer(graph, f"{name}_tied_zero_points", zero.reshape(rows, blocks, 1)))
        gather = ir.node("GatherBlockQuantized", inputs, {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 2},
                         domain=MS_DOMAIN, name=f"{name}_tied_gather")
        out_shape = _initializer(graph, f"{name}_tied_out_shape", np.array([0, 0, width], np.int64))
        rows_out = ir.node("Reshape", [gather.outputs[0], out_shape], name=f"{name}_tied_rows")
        new_nodes += [gather, rows_out]
        _replace(graph, [node], new_nodes, [node.outputs[0]], [rows_out.outputs[0]])
        RemoveUnusedNodesPass()(model)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("embedding %s now reads the int4 LM head's table (%s)", name, head.name)
        return name
    return None
