"""Graph patterns the serving rewrites (`serving.py`) look for in an exported decoder,
and the facts about them that need a run to establish.

- `rotary`: `x * cos + rotate_half(x) * sin`, the rotary embedding of Llama-like models, and
  `tables`: its cos/sin for every position, computed by the graph's own subgraph;
- `pack_int4`: three MatMulNBits of one input as one;
- `plain_causal_bias`: whether an attention's additive bias is exactly "causal, and blind to
  the padded keys of `attention_mask`", checked by running its subgraph on left-padded batches
  with and without a past, so the rewrite may rebuild it from the mask in a few ops.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from planc.backends.onnx.lowering import MS_DOMAIN


def op_is(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain in ((domain,) if domain else ("", "ai.onnx"))


def ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.value)


def const(value: ir.Value | None) -> np.ndarray | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def length(shape: ir.Value) -> int | None:
    """Length of a 1-D shape tensor: a constant, or a Concat of constants and one-element reads
    (`Shape(x, start=i, end=i + 1)`, Unsqueezes of scalars, as the exporter writes them)."""
    constant = const(shape)
    if constant is not None:
        return constant.size
    concat = shape.producer()
    if not op_is(concat, "Concat"):
        return None
    total = 0
    for value in concat.inputs:
        part, producer = const(value), value.producer()
        if part is not None:
            total += part.size
        elif op_is(producer, "Shape") and producer.attributes.get_int("end", 0) - producer.attributes.get_int("start", 0) == 1:
            total += 1
        elif op_is(producer, "Unsqueeze") or op_is(producer, "Reshape"):
            total += 1
        else:
            return None
    return total


#: Ops a cos/sin subgraph may use to be tabulated once: functions of `position_ids` alone
#: (no data-dependent scaling such as dynamic NTK's, which looks at the longest position).
_TABLE_OPS = {"Unsqueeze", "Cast", "Mul", "MatMul", "Transpose", "Concat", "Cos", "Sin", "Expand", "Reshape",
              "Constant", "Shape", "Gather", "Slice", "Squeeze", "Div"}


def _slice_half(node: ir.Node | None, x: ir.Value, half: int, first: bool) -> bool:
    """Is `node` `Slice(x)` of the first (or second) `half` elements of the last axis (x's last
    axis being 2 * half long)?"""
    if not op_is(node, "Slice") or node.inputs[0] is not x or len(node.inputs) < 4:
        return False
    starts, ends, axes = (const(v) for v in node.inputs[1:4])
    if starts is None or ends is None or axes is None or int(axes.reshape(-1)[0]) not in (-1, 3):
        return False
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    return (start, end) == (0, half) if first else (start == half and end >= 2 * half)


def rotary(value: ir.Value, head_dim: int) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(x, cos, sin) when `value` is `x * Unsqueeze(cos, 1) + rotate_half(x) * Unsqueeze(sin, 1)`,
    x [batch, heads, seq, head_dim], cos/sin [batch, seq, head_dim]."""
    add = value.producer()
    if not op_is(add, "Add"):
        return None
    for plain, rotated in (add.inputs, reversed(add.inputs)):
        mul_cos, mul_sin = plain.producer(), rotated.producer()
        if not (op_is(mul_cos, "Mul") and op_is(mul_sin, "Mul")):
            continue
        for half_value, sin4 in (mul_sin.inputs, reversed(mul_sin.inputs)):
            concat = half_value.producer()
            if not op_is(concat, "Concat") or len(concat.inputs) != 2:
                continue
            neg, low = concat.inputs[0].producer(), concat.inputs[1].producer()
            if not op_is(neg, "Neg") or low is None:
                continue
            x = low.inputs[0]
            half = head_dim // 2
            if not (_slice_half(low, x, half, first=True) and _slice_half(neg.inputs[0].producer(), x, half, first=False)):
                continue
            if x not in mul_cos.inputs:
                continue
            cos4 = mul_cos.inputs[1] if mul_cos.inputs[0] is x else mul_cos.inputs[0]
            tables = [unsqueezed(v) for v in (cos4, sin4)]
            if tables[0] is not None and tables[1] is not None:
                return x, tables[0], tables[1]
    return None


def unsqueezed(value: ir.Value) -> ir.Value | None:
    """v of `Unsqueeze(v, [1])`."""
    node = value.producer()
    if not op_is(node, "Unsqueeze") or len(node.inputs) < 2:
        return None
    axes = const(node.inputs[1])
    return node.inputs[0] if axes is not None and axes.reshape(-1).tolist() == [1] else None


def tables(model: ir.Model, cos: ir.Value, sin: ir.Value, positions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """GroupQueryAttention's cos/sin caches [positions, head_dim / 2], computed by running the
    graph's own cos/sin subgraphs for positions 0 .. positions - 1; None when they read anything
    but `position_ids`, use other ops, or are not two equal halves (`cat(freqs, freqs)`)."""
    import onnxruntime as ort

    from planc.backends.onnx.optimize import _subgraph_proto

    tables = []
    for value in (cos, sin):
        proto, inputs = _subgraph_proto(model, value)
        if [v.name for v in inputs] != ["position_ids"] or any(n.op_type not in _TABLE_OPS for n in proto.graph.node):
            return None
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        table = session.run(None, {"position_ids": np.arange(positions, dtype=np.int64)[None]})[0]
        if table.ndim != 3 or table.shape[:2] != (1, positions):
            return None
        half = table.shape[-1] // 2
        if not np.array_equal(table[0, :, :half], table[0, :, half:]):
            return None
        tables.append(np.ascontiguousarray(table[0, :, :half], dtype=np.float32))
    return tables[0], tables[1]


def pack_int4(values: list[ir.Value]) -> tuple[list, dict] | None:
    """(inputs, attributes) of one MatMulNBits computing the three `values` side by side, when
    each is a MatMulNBits of the same input with the same attributes, constant weights and no bias."""
    nodes = [v.producer() for v in values]
    if not all(op_is(n, "MatMulNBits", MS_DOMAIN) for n in nodes):
        return None
    attrs = [{k: a.value for k, a in n.attributes.items() if k != "N"} for n in nodes]
    if any(a != attrs[0] for a in attrs) or any(n.inputs[0] is not nodes[0].inputs[0] for n in nodes):
        return None
    if any(len(n.inputs) > 4 and any(v is not None for v in n.inputs[4:]) for n in nodes):
        return None  # g_idx or bias
    arrays = [[const(v) if v is not None else None for v in list(n.inputs[1:4]) + [None] * (4 - len(n.inputs))] for n in nodes]
    if any(a[0] is None or a[1] is None for a in arrays):
        return None
    has_zero = [a[2] is not None for a in arrays]
    if any(has_zero) and not all(has_zero):
        return None
    rows = [n.attributes.get_int("N") for n in nodes]
    packed = [np.concatenate([a[0] for a in arrays], axis=0)]
    for k in (1, 2) if all(has_zero) else (1,):
        parts = [a[k].reshape(r, -1) for a, r in zip(arrays, rows)]
        packed.append(np.concatenate(parts, axis=0).reshape((-1,) if arrays[0][k].ndim == 1 else (sum(rows), -1)))
    return [nodes[0].inputs[0], *packed], {**attrs[0], "N": sum(rows)}


#: (past, new tokens) of the batches `plain_causal_bias` runs: a prefill, a decode step, a chunk.
_BIAS_PROBES = ((0, 7), (6, 1), (4, 3))
#: Bias values at or below this hide a key; values of magnitude below `_KEPT` keep it.
_HIDDEN, _KEPT = -1e4, 1e-6


def _probe_value(value: ir.Value, batch: int, past: int, seq: int, mask: np.ndarray) -> np.ndarray:
    """A feed for graph input `value` in a probe batch: the mask, zeros of the right shape else."""
    if value.name == "attention_mask":
        return mask
    if value.name == "position_ids":
        return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]
    dims = []
    for axis, dim in enumerate(value.shape or ()):
        if isinstance(dim, int):
            dims.append(dim)
        elif axis == 0:
            dims.append(batch)
        else:
            dims.append(past if value.name.startswith("past_key_values.") else seq)
    return np.zeros(dims, ir.DataType(value.dtype).numpy() if value.dtype is not None else np.int64)


def plain_causal_bias(model: ir.Model, bias: ir.Value) -> bool:
    """Is `bias` [batch, 1, seq, past + seq] exactly: 0 where a real query may see a key (not
    after it, not a padded key), hidden (<= -1e4) elsewhere? Decided by running its subgraph on
    left-padded batches with and without a past; rows of padded queries are not checked (no
    real token reads them). Masks that depend on more than that (a sliding window shorter than
    the probe, chunked attention) fail; a window longer than the probe cannot be seen here, so
    `fusions` only asks about models whose config names no window."""
    import onnxruntime as ort

    from planc.backends.onnx.optimize import _subgraph_proto

    try:
        proto, inputs = _subgraph_proto(model, bias)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an unextractable bias keeps the model's own mask
        return False
    if not any(v.name == "attention_mask" for v in inputs):
        return False
    batch = 2
    for past, seq in _BIAS_PROBES:
        total = past + seq
        mask = np.ones((batch, total), np.int64)
        mask[0, : 3] = 0  # left padding, reaching into the new tokens when the past is short
        feeds = {v.name: _probe_value(v, batch, past, seq, mask) for v in inputs}
        try:
            out = np.asarray(session.run(None, feeds)[0], np.float32)
            out = np.broadcast_to(out, (batch, out.shape[1], seq, total))
        except Exception:  # noqa: BLE001
            return False
        query_pos = np.arange(past, total)[:, None]
        expected = (np.arange(total)[None, :] <= query_pos)[None] & mask[:, None, :].astype(bool)
        real_rows = mask[:, past:].astype(bool)  # [batch, seq]
        for head in range(out.shape[1]):
            got = out[:, head]
            kept, hidden = np.abs(got) < _KEPT, got <= _HIDDEN
            if not np.all((kept | hidden)[real_rows]) or not np.array_equal(kept[real_rows], expected[real_rows]):
                return False
    return True
