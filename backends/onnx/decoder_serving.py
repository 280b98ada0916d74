"""Rewrites that make an exported decoder cheap to serve: ONNX Runtime's GroupQueryAttention, a
key/value buffer shared between past and present, logits of the last positions only.

After onnxscript's fusions (`decoder.apply_ort_fusions`) every attention of a Hugging Face
decoder is a `MultiHeadAttention` whose keys and values are the layer's present cache, repeated
to the query heads when the model uses grouped-query attention, and whose additive bias is the
model's own causal + padding mask. Two rewrites take it from there:

1. `fuse_gqa`: each such attention becomes one `com.microsoft::GroupQueryAttention` that appends
   the new keys/values to the past itself and reads the key/value heads without repeating
   them. The kernel's own length bookkeeping (`seqlens_k`, built for right-padded batches) is
   told that every cache slot is filled (`seqlens_k = total - 1` for every row), and the model's
   mask, passed as `attention_bias`, hides the left padding exactly as before. Positions and
   rotary embeddings stay in the graph, computed as the model computes them, so the rewrite
   changes no number beyond float reassociation (the export's probe checks that).
2. `share_buffers`: with every past tensor read only by GroupQueryAttention, and by `Shape`
   nodes whose length reads are replaced by `total - sequence` from `attention_mask` and
   `input_ids`, the graph no longer depends on the past tensors' length. A caller may then bind
   one buffer of `max_length` slots per key/value as both `past_key_values.{i}.*` and
   `present.{i}.*`: the kernel writes the new slots in place, and nothing is copied per step
   (ORT GenAI's `past_present_share_buffer`). The same graph still runs with a growing cache
   (past of `past` slots, present of `past + seq`): presents are `max(past slots, total)` long.
3. `add_logits_to_keep`: an int64 [1] input `logits_to_keep` (Hugging Face's argument of that
   name) cuts the LM head's input to the last k positions; it has a default of 0, meaning all
   positions, so callers that do not know it (scoring, Optimum's loop) are unaffected, and a
   prefill that passes 1 multiplies one position per row by the vocabulary projection.

Anything that does not match is left as it was; the rewrites return what they did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from planc.backends.onnx.lowering import MS_DOMAIN

logger = logging.getLogger(__name__)

PAST_PREFIX = "past_key_values."
#: Axis of the sequence in the BNSH key/value cache.
_SEQ_AXIS = 2


def _op(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain in ((domain,) if domain else ("", "ai.onnx"))


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.value)


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _length(shape: ir.Value) -> int | None:
    """Length of a 1-D shape tensor: a constant, or a Concat of constants and one-element reads
    (`Shape(x, start=i, end=i + 1)`, Unsqueezes of scalars, as the exporter writes them)."""
    constant = _const(shape)
    if constant is not None:
        return constant.size
    concat = shape.producer()
    if not _op(concat, "Concat"):
        return None
    total = 0
    for value in concat.inputs:
        part, producer = _const(value), value.producer()
        if part is not None:
            total += part.size
        elif _op(producer, "Shape") and producer.attributes.get_int("end", 0) - producer.attributes.get_int("start", 0) == 1:
            total += 1
        elif _op(producer, "Unsqueeze") or _op(producer, "Reshape"):
            total += 1
        else:
            return None
    return total


@dataclass
class _Attention:
    """One `MultiHeadAttention` over a layer's present cache, as `fuse_gqa` rewrites it."""

    node: ir.Node
    heads: int
    kv_heads: int
    query: ir.Value  #: [batch, seq, heads * head_dim], position embeddings applied
    new_key: ir.Value  #: [batch, kv_heads, seq, head_dim] (the present Concat's second input)
    new_value: ir.Value
    past_key: ir.Value  #: graph inputs
    past_value: ir.Value
    present_key: ir.Value  #: graph outputs (the Concats' outputs)
    present_value: ir.Value
    bias: ir.Value | None


def _present_of(value: ir.Value, heads: int) -> tuple[ir.Value, int] | None:
    """The present Concat output that a MultiHeadAttention key/value input [batch, seq, heads *
    head_dim] is made of, and its key/value head count: `Reshape(Transpose(x, [0, 2, 1, 3]))`
    with x the present itself or its heads repeated (`Reshape(Expand(Unsqueeze(present, 2)))`)."""
    reshape = value.producer()
    if not _op(reshape, "Reshape"):
        return None
    transpose = reshape.inputs[0].producer()
    if not _op(transpose, "Transpose") or _ints(transpose, "perm") != [0, 2, 1, 3]:
        return None
    source = transpose.inputs[0]
    repeat = source.producer()
    if _op(repeat, "Reshape"):
        expand = repeat.inputs[0].producer()
        unsqueeze = expand.inputs[0].producer() if _op(expand, "Expand") else None
        if not _op(unsqueeze, "Unsqueeze"):
            return None
        axes = _const(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
        if axes is None or axes.reshape(-1).tolist() != [_SEQ_AXIS]:
            return None
        source = unsqueeze.inputs[0]
    concat = source.producer()
    if not _op(concat, "Concat") or concat.attributes.get_int("axis", 0) not in (_SEQ_AXIS, -2) or len(concat.inputs) != 2:
        return None
    past = concat.inputs[0]
    if not (past.is_graph_input() and past.name.startswith(PAST_PREFIX)) or not source.is_graph_output():
        return None
    shape = past.shape
    kv_heads = shape[1] if shape is not None and len(shape) == 4 else None
    if not isinstance(kv_heads, int) or heads % kv_heads:
        return None
    return source, kv_heads


def _match(node: ir.Node) -> _Attention | None:
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    query, key, value, bias_qkv, padding, bias, past_k, past_v = inputs[:8]
    if any(v is not None for v in (bias_qkv, padding, past_k, past_v)) or key is None or value is None:
        return None
    heads = node.attributes.get_int("num_heads", 0)
    key_source, value_source = _present_of(key, heads), _present_of(value, heads)
    if key_source is None or value_source is None or key_source[1] != value_source[1]:
        return None
    present_key, present_value = key_source[0], value_source[0]
    key_concat, value_concat = present_key.producer(), present_value.producer()
    return _Attention(node, heads, key_source[1], query, key_concat.inputs[1], value_concat.inputs[1],
                      key_concat.inputs[0], value_concat.inputs[0], present_key, present_value, bias)


def transpose_input(query: ir.Value) -> ir.Value:
    """x of MultiHeadAttention's query `Reshape(Transpose(x, [0, 2, 1, 3]))` (checked by `_rotary_pair`)."""
    return query.producer().inputs[0].producer().inputs[0]


def _rotary_pair(found: _Attention, max_positions: int | None) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value] | None:
    """(q, k before rotation [batch, heads, seq, head_dim], cos, sin) when query and new keys
    are rotated by the same cos/sin; the query is MultiHeadAttention's `Reshape(Transpose(q_rot))`."""
    if max_positions is None:
        return None
    reshape = found.query.producer()
    transpose = reshape.inputs[0].producer() if _op(reshape, "Reshape") else None
    if not _op(transpose, "Transpose") or _ints(transpose, "perm") != [0, 2, 1, 3]:
        return None
    shape = found.past_key.shape
    head_dim = shape[3] if shape is not None and len(shape) == 4 else None
    if not isinstance(head_dim, int) or head_dim % 2:
        return None
    query, key = _rotary(transpose.inputs[0], head_dim), _rotary(found.new_key, head_dim)
    if query is None or key is None or query[1] is not key[1] or query[2] is not key[2]:
        return None
    return query[0], key[0], query[1], query[2]


class _Builder:
    """New nodes of the rewrite, inserted before a given node; shared values made once."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._lengths: tuple[ir.Value, ir.Value] | None = None
        self._past_length: ir.Value | None = None

    def add(self, before: ir.Node, op: str, inputs: list, attrs: dict | None = None, domain: str = "",
            outputs: int = 1, name: str = "") -> ir.Node:
        node = ir.node(op, inputs, attrs or {}, domain=domain, num_outputs=outputs, name=name or None)
        self.graph.insert_before(before, node)
        return node

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        base, suffix = name, 0
        while name in self.graph.initializers:
            suffix += 1
            name = f"{base}_{suffix}"
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def graph_input(self, name: str) -> ir.Value:
        found = [v for v in self.graph.inputs if v.name == name]
        if not found:
            raise KeyError(name)
        return found[0]

    def lengths(self) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k int32 [batch] = total - 1 in every row, total_sequence_length int32 scalar)."""
        if self._lengths is None:
            first = self.graph.node(0)
            mask = self.graph_input("attention_mask")
            ids = self.graph_input("input_ids")
            total = self.add(first, "Shape", [mask], {"start": 1, "end": 2}, name="gqa_total_1d").outputs[0]
            last = self.add(first, "Sub", [total, self.constant("gqa_one", np.array([1], np.int64))], name="gqa_last_slot").outputs[0]
            batch = self.add(first, "Shape", [ids], {"start": 0, "end": 1}, name="gqa_batch").outputs[0]
            rows = self.add(first, "Expand", [last, batch], name="gqa_seqlens_i64").outputs[0]
            seqlens = self.add(first, "Cast", [rows], {"to": ir.DataType.INT32}, name="gqa_seqlens_k").outputs[0]
            scalar = self.add(first, "Squeeze", [total, self.constant("gqa_axis0", np.array([0], np.int64))], name="gqa_total").outputs[0]
            total32 = self.add(first, "Cast", [scalar], {"to": ir.DataType.INT32}, name="gqa_total_sequence_length").outputs[0]
            seqlens.name, total32.name = "gqa_seqlens_k", "gqa_total_sequence_length"
            self._lengths = (seqlens, total32)
        return self._lengths

    def past_length(self) -> ir.Value:
        """int64 [1]: cached tokens before this call, from the mask and ids (not the past tensors)."""
        if self._past_length is None:
            first = self.graph.node(0)
            total = self.add(first, "Shape", [self.graph_input("attention_mask")], {"start": 1, "end": 2}, name="past_total").outputs[0]
            seq = self.add(first, "Shape", [self.graph_input("input_ids")], {"start": 1, "end": 2}, name="past_seq").outputs[0]
            self._past_length = self.add(first, "Sub", [total, seq], name="past_sequence_length").outputs[0]
            self._past_length.name = "past_sequence_length_from_mask"
        return self._past_length

    def reroute_length_reads(self, bnsh: ir.Value, ids_name: str) -> None:
        """`Shape(x, 2, 3)` of a [batch, heads, seq, head_dim] value the rewrite leaves behind
        (the mask's Expand reads the query's length) -> `Shape(input_ids, 1, 2)`, the same number."""
        for use in list(bnsh.uses()):
            user = use.node
            if _op(user, "Shape") and (user.attributes.get_int("start", 0), user.attributes.get_int("end", 4)) == (2, 3):
                seq = self.add(user, "Shape", [self.graph_input(ids_name)], {"start": 1, "end": 2}, name=f"{user.name}_from_ids")
                user.outputs[0].replace_all_uses_with(seq.outputs[0])

    def bsd(self, before: ir.Node, bnsh: ir.Value, name: str) -> ir.Value:
        """[batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]."""
        transpose = bnsh.producer()
        if _op(transpose, "Transpose") and _ints(transpose, "perm") == [0, 2, 1, 3]:
            reshape = transpose.inputs[0].producer()
            # x [b, s, n * d] viewed as [b, s, n, d] and transposed: x itself is the BSD form.
            # (Shapes are unknown after the fusions; a wrong guess fails the export's probe.)
            if _op(reshape, "Reshape") and _length(reshape.inputs[1]) == 4:
                return reshape.inputs[0]
        moved = self.add(before, "Transpose", [bnsh], {"perm": [0, 2, 1, 3]}, name=f"{name}_bsnh").outputs[0]
        flat = self.constant("gqa_bsd_shape", np.array([0, 0, -1], np.int64))
        return self.add(before, "Reshape", [moved, flat], name=f"{name}_bsd").outputs[0]


#: Ops a cos/sin subgraph may use to be tabulated once: functions of `position_ids` alone
#: (no data-dependent scaling such as dynamic NTK's, which looks at the longest position).
_TABLE_OPS = {"Unsqueeze", "Cast", "Mul", "MatMul", "Transpose", "Concat", "Cos", "Sin", "Expand", "Reshape",
              "Constant", "Shape", "Gather", "Slice", "Squeeze", "Div"}


def _slice_half(node: ir.Node | None, x: ir.Value, half: int, first: bool) -> bool:
    """Is `node` `Slice(x)` of the first (or second) `half` elements of the last axis (x's last
    axis being 2 * half long)?"""
    if not _op(node, "Slice") or node.inputs[0] is not x or len(node.inputs) < 4:
        return False
    starts, ends, axes = (_const(v) for v in node.inputs[1:4])
    if starts is None or ends is None or axes is None or int(axes.reshape(-1)[0]) not in (-1, 3):
        return False
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    return (start, end) == (0, half) if first else (start == half and end >= 2 * half)


def _rotary(value: ir.Value, head_dim: int) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(x, cos, sin) when `value` is `x * Unsqueeze(cos, 1) + rotate_half(x) * Unsqueeze(sin, 1)`,
    x [batch, heads, seq, head_dim], cos/sin [batch, seq, head_dim]."""
    add = value.producer()
    if not _op(add, "Add"):
        return None
    for plain, rotated in (add.inputs, reversed(add.inputs)):
        mul_cos, mul_sin = plain.producer(), rotated.producer()
        if not (_op(mul_cos, "Mul") and _op(mul_sin, "Mul")):
            continue
        for half_value, sin4 in (mul_sin.inputs, reversed(mul_sin.inputs)):
            concat = half_value.producer()
            if not _op(concat, "Concat") or len(concat.inputs) != 2:
                continue
            neg, low = concat.inputs[0].producer(), concat.inputs[1].producer()
            if not _op(neg, "Neg") or low is None:
                continue
            x = low.inputs[0]
            half = head_dim // 2
            if not (_slice_half(low, x, half, first=True) and _slice_half(neg.inputs[0].producer(), x, half, first=False)):
                continue
            if x not in mul_cos.inputs:
                continue
            cos4 = mul_cos.inputs[1] if mul_cos.inputs[0] is x else mul_cos.inputs[0]
            tables = [_unsqueezed(v) for v in (cos4, sin4)]
            if tables[0] is not None and tables[1] is not None:
                return x, tables[0], tables[1]
    return None


def _unsqueezed(value: ir.Value) -> ir.Value | None:
    """v of `Unsqueeze(v, [1])`."""
    node = value.producer()
    if not _op(node, "Unsqueeze") or len(node.inputs) < 2:
        return None
    axes = _const(node.inputs[1])
    return node.inputs[0] if axes is not None and axes.reshape(-1).tolist() == [1] else None


def _tables(model: ir.Model, cos: ir.Value, sin: ir.Value, positions: int) -> tuple[np.ndarray, np.ndarray] | None:
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


def _pack_int4(values: list[ir.Value]) -> tuple[list, dict] | None:
    """(inputs, attributes) of one MatMulNBits computing the three `values` side by side, when
    each is a MatMulNBits of the same input with the same attributes, constant weights and no bias."""
    nodes = [v.producer() for v in values]
    if not all(_op(n, "MatMulNBits", MS_DOMAIN) for n in nodes):
        return None
    attrs = [{k: a.value for k, a in n.attributes.items() if k != "N"} for n in nodes]
    if any(a != attrs[0] for a in attrs) or any(n.inputs[0] is not nodes[0].inputs[0] for n in nodes):
        return None
    if any(len(n.inputs) > 4 and any(v is not None for v in n.inputs[4:]) for n in nodes):
        return None  # g_idx or bias
    arrays = [[_const(v) if v is not None else None for v in list(n.inputs[1:4]) + [None] * (4 - len(n.inputs))] for n in nodes]
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


def fuse_gqa(model: ir.Model, max_positions: int | None = None) -> int:
    """Rewrite every matching MultiHeadAttention as GroupQueryAttention, in place; returns the count."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    matches = [m for node in list(graph) if _op(node, "MultiHeadAttention", MS_DOMAIN) and (m := _match(node))]
    if not matches:
        return 0
    builder = _Builder(graph)
    caches: dict[tuple[int, int], tuple[ir.Value, ir.Value] | None] = {}
    for i, found in enumerate(matches):
        node = found.node
        seqlens, total = builder.lengths()
        attrs = {"num_heads": found.heads, "kv_num_heads": found.kv_heads, "do_rotary": 0}
        if "scale" in node.attributes:
            attrs["scale"] = node.attributes.get_float("scale")
        query, new_key, cos_cache, sin_cache = found.query, found.new_key, None, None
        rotary = _rotary_pair(found, max_positions)
        if rotary is not None:
            tables = (id(rotary[2]), id(rotary[3]))
            if tables not in caches:
                computed = _tables(model, rotary[2], rotary[3], max_positions)
                caches[tables] = None if computed is None else (
                    builder.constant("gqa_cos_cache", computed[0]), builder.constant("gqa_sin_cache", computed[1]))
            if caches[tables] is not None:
                builder.reroute_length_reads(transpose_input(found.query), "input_ids")
                query = builder.bsd(node, rotary[0], f"gqa{i}_query")
                new_key = rotary[1]
                cos_cache, sin_cache = caches[tables]
                attrs.update(do_rotary=1, rotary_interleaved=0)
        key = builder.bsd(node, new_key, f"gqa{i}_key")
        value = builder.bsd(node, found.new_value, f"gqa{i}_value")
        packed = _pack_int4([query, key, value]) if cos_cache is not None else None
        if packed is not None:
            weights = [builder.constant(f"gqa{i}_qkv_{part}", array) for part, array in zip(("weight", "scales", "zero_points"), packed[0][1:])]
            qkv = builder.add(node, "MatMulNBits", [packed[0][0], *weights], packed[1], MS_DOMAIN, name=f"gqa{i}_qkv")
            query, key, value = qkv.outputs[0], None, None
        inputs = [query, key, value, found.past_key, found.past_value, seqlens, total, cos_cache, sin_cache, None, found.bias]
        gqa = builder.add(node, "GroupQueryAttention", inputs, attrs, MS_DOMAIN, outputs=3, name=f"{node.name or 'attention'}_gqa")
        out, present_key, present_value = gqa.outputs
        for old, new in ((found.present_key, present_key), (found.present_value, present_value)):
            name, shape, dtype = old.name, old.shape, old.type
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = None
            new.name, new.type = name, dtype
            new.shape = ir.Shape([shape[0], shape[1], ir.SymbolicDim("present_sequence_length"), shape[3]]) if shape is not None else None
        node.outputs[0].replace_all_uses_with(out)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    RemoveUnusedNodesPass()(model)
    logger.info("GroupQueryAttention: %d attentions rewritten", len(matches))
    return len(matches)


def share_buffers(model: ir.Model) -> bool:
    """Make the graph independent of the past tensors' length (see the module docstring), in
    place; False (and the graph unchanged) when a past tensor has another reader."""
    graph = model.graph
    pasts = [v for v in graph.inputs if v.name and v.name.startswith(PAST_PREFIX)]
    if not pasts:
        return False
    length_reads: list[ir.Node] = []
    for past in pasts:
        for use in past.uses():
            user = use.node
            if _op(user, "GroupQueryAttention", MS_DOMAIN) and use.idx in (3, 4):
                continue
            if not _op(user, "Shape"):
                return False
            start = user.attributes.get_int("start", 0)
            end = user.attributes.get_int("end", 4)
            start, end = start % 4 if start < 0 else start, end % 4 if end < 0 else min(end, 4)
            if start <= _SEQ_AXIS < end:
                if (start, end) != (_SEQ_AXIS, _SEQ_AXIS + 1):
                    return False  # whole-shape reads: none of the exports seen do this
                length_reads.append(user)
    builder = _Builder(graph)
    for read in length_reads:
        read.outputs[0].replace_all_uses_with(builder.past_length())
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    for past in pasts:
        shape = past.shape
        if shape is not None and len(shape) == 4:
            past.shape = ir.Shape([shape[0], shape[1], ir.SymbolicDim("past_buffer_length"), shape[3]])
    return True


LOGITS_TO_KEEP = "logits_to_keep"
#: Ops between the LM head's matmul and `logits` that act on each position alone.
_POSITIONWISE = {"Add", "Mul", "Div", "Sub", "Tanh", "Cast", "Softcap"}
_HEADS = {("MatMul", ""), ("MatMulNBits", MS_DOMAIN), ("DynamicQuantizeMatMul", MS_DOMAIN), ("MatMulIntegerToFloat", MS_DOMAIN)}


def add_logits_to_keep(model: ir.Model) -> bool:
    """Add the `logits_to_keep` input (see the module docstring), in place; False when the
    `logits` output is not a matmul of the hidden states (then the graph is unchanged)."""
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    node = logits.producer() if logits is not None else None
    while node is not None and (node.op_type, node.domain if node.domain != "ai.onnx" else "") not in _HEADS:
        varying = [v for v in node.inputs if v is not None and _const(v) is None]
        if node.op_type not in _POSITIONWISE or len(varying) != 1:
            return False
        node = varying[0].producer()
    if node is None:
        return False
    hidden = node.inputs[0]
    keep = ir.Value(name=LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                    const_value=ir.tensor(np.array([0], np.int64), name=LOGITS_TO_KEEP))
    graph.inputs.append(keep)
    graph.register_initializer(keep)
    builder = _Builder(graph)
    start = builder.add(node, "Neg", [keep], name="logits_start").outputs[0]
    end = builder.constant("logits_end", np.array([np.iinfo(np.int64).max], np.int64))
    axis = builder.constant("logits_axis", np.array([1], np.int64))
    kept = builder.add(node, "Slice", [hidden, start, end, axis], name="logits_kept_positions").outputs[0]
    node.replace_input_with(0, kept)
    shape = logits.shape
    if shape is not None and len(shape) == 3:
        logits.shape = ir.Shape([shape[0], ir.SymbolicDim("logits_length"), shape[2]])
    return True
