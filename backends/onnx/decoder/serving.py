"""Rewrites that make an exported decoder cheap to serve: ONNX Runtime's GroupQueryAttention, a
key/value buffer shared between past and present, logits of the last positions only.

After onnxscript's fusions (`fusions.apply_ort_fusions`) every attention of a Hugging Face
decoder is a `MultiHeadAttention` whose keys and values are the layer's present cache, repeated
to the query heads when the model uses grouped-query attention, and whose additive bias is the
model's own causal + padding mask. Two rewrites take it from there:

1. `fuse_gqa`: each such attention becomes one `com.microsoft::GroupQueryAttention` that appends
   the new keys/values to the past itself and reads the key/value heads without repeating
   them. The kernel's own length bookkeeping (`seqlens_k`, built for right-padded batches) is
   told that every cache slot is filled (`seqlens_k = total - 1` for every row), and an
   `attention_bias` hides the left padding: the model's own mask, or, when a run shows that
   mask to be exactly "causal and blind to padded keys" (`patterns.plain_causal_bias`), the
   same numbers rebuilt from `attention_mask` in a few ops (the kernel is causal itself).
   Rotary embeddings (`x * cos + rotate_half(x) * sin`, cos/sin from `position_ids` alone)
   move into the kernel (`do_rotary`) with cos/sin tables the graph's own subgraph computes for
   every position. The kernel rotates a token by its cache slot, which in a left-padded row is
   its position plus the row's padding; rotary scores depend only on the distance between
   query and key, so they are the model's (up to float rounding), and the cache holds keys
   rotated by slot, which only this graph reads. Three MatMulNBits q/k/v projections of one
   input become one, whose packed output the kernel splits.
2. `share_buffers`: with every past tensor read only by GroupQueryAttention, and by `Shape`
   nodes whose length reads are replaced by `total - sequence` from `attention_mask` and
   `input_ids`, the graph no longer depends on the past tensors' length. A caller may then bind
   one buffer of `max_length` slots per key/value as both `past_key_values.{i}.*` and
   `present.{i}.*`: the kernel writes the new slots in place, and nothing is copied per step
   (ORT GenAI's `past_present_share_buffer`). The same graph still runs with a growing cache
   (past of `past` slots, present of `past + seq`): presents are `max(past slots, total)` long.
3. `add_logits_to_keep`: an int64 [1] input `logits_to_keep` (Hugging Face's argument of that
   name) cuts the LM head's input to the last k positions, 0 meaning all positions, so a
   prefill that passes 1 multiplies one position per row by the vocabulary projection. It is a
   plain input without a default: an initializer of the same name would make ONNX Runtime warn
   at every load that it cannot fold it, so every caller feeds it (`logits_to_keep_feed`).

4. `merge_int4_siblings`: MatMulNBits of one input with equal attributes (gate and up) become
   one over concatenated weights, then a Split.

Anything that does not match is left as it was; the rewrites return what they did.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from planc.backends.onnx.decoder import patterns
from planc.backends.onnx.decoder.patterns import const, ints, length, op_is
from planc.backends.onnx.lowering import MS_DOMAIN

logger = logging.getLogger(__name__)

PAST_PREFIX = "past_key_values."
#: Axis of the sequence in the BNSH key/value cache.
_SEQ_AXIS = 2


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
    if not op_is(reshape, "Reshape"):
        return None
    transpose = reshape.inputs[0].producer()
    if not op_is(transpose, "Transpose") or ints(transpose, "perm") != [0, 2, 1, 3]:
        return None
    source = transpose.inputs[0]
    repeat = source.producer()
    if op_is(repeat, "Reshape"):
        expand = repeat.inputs[0].producer()
        unsqueeze = expand.inputs[0].producer() if op_is(expand, "Expand") else None
        if not op_is(unsqueeze, "Unsqueeze"):
            return None
        axes = const(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
        if axes is None or axes.reshape(-1).tolist() != [_SEQ_AXIS]:
            return None
        source = unsqueeze.inputs[0]
    concat = source.producer()
    if not op_is(concat, "Concat") or concat.attributes.get_int("axis", 0) not in (_SEQ_AXIS, -2) or len(concat.inputs) != 2:
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
    transpose = reshape.inputs[0].producer() if op_is(reshape, "Reshape") else None
    if not op_is(transpose, "Transpose") or ints(transpose, "perm") != [0, 2, 1, 3]:
        return None
    shape = found.past_key.shape
    head_dim = shape[3] if shape is not None and len(shape) == 4 else None
    if not isinstance(head_dim, int) or head_dim % 2:
        return None
    query, key = patterns.rotary(transpose.inputs[0], head_dim), patterns.rotary(found.new_key, head_dim)
    if query is None or key is None or query[1] is not key[1] or query[2] is not key[2]:
        return None
    return query[0], key[0], query[1], query[2]


class _Builder:
    """New nodes of the rewrite, inserted before a given node; shared values made once."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._lengths: tuple[ir.Value, ir.Value] | None = None
        self._past_length: ir.Value | None = None
        self._padding_bias: ir.Value | None = None

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

    def lengths(self) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(seqlens_k int32 [batch] = total - 1 in every row, total_sequence_length int32 scalar,
        query_seqlens int32 [batch] = seq in every row). The last makes the kernel accept a chunk
        of several new tokens over a past in a batch (speculative decoding's verification call);
        every row's chunk is whole: left padding lives in the mask, not in the chunk."""
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
            seq = self.add(first, "Shape", [ids], {"start": 1, "end": 2}, name="gqa_seq").outputs[0]
            chunk = self.add(first, "Expand", [seq, batch], name="gqa_query_seqlens_i64").outputs[0]
            query = self.add(first, "Cast", [chunk], {"to": ir.DataType.INT32}, name="gqa_query_seqlens").outputs[0]
            seqlens.name, total32.name, query.name = "gqa_seqlens_k", "gqa_total_sequence_length", "gqa_query_seqlens"
            self._lengths = (seqlens, total32, query)
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

    def padding_bias(self) -> ir.Value:
        """[batch, 1, seq, total]: float32's lowest where `attention_mask` is 0, else 0."""
        if self._padding_bias is None:
            first = self.graph.node(0)
            mask = self.graph_input("attention_mask")
            padded = self.add(first, "Equal", [mask, self.constant("bias_zero_i64", np.array(0, np.int64))], name="padded_keys").outputs[0]
            lowest = self.constant("bias_lowest", np.array(np.finfo(np.float32).min, np.float32))
            rows = self.add(first, "Where", [padded, lowest, self.constant("bias_zero", np.array(0, np.float32))], name="padding_bias_2d").outputs[0]
            keys = self.add(first, "Unsqueeze", [rows, self.constant("bias_axes", np.array([1, 2], np.int64))], name="padding_bias_4d").outputs[0]
            seq = self.add(first, "Shape", [self.graph_input("input_ids")], {"start": 1, "end": 2}, name="bias_seq").outputs[0]
            one = self.constant("bias_one", np.array([1], np.int64))
            shape = self.add(first, "Concat", [one, one, seq, one], {"axis": 0}, name="bias_shape").outputs[0]
            self._padding_bias = self.add(first, "Expand", [keys, shape], name="padding_bias").outputs[0]
            self._padding_bias.name = "padding_bias"
        return self._padding_bias

    def reroute_length_reads(self, bnsh: ir.Value, ids_name: str) -> None:
        """`Shape(x, 2, 3)` of a [batch, heads, seq, head_dim] value the rewrite leaves behind
        (the mask's Expand reads the query's length) -> `Shape(input_ids, 1, 2)`, the same number."""
        for use in list(bnsh.uses()):
            user = use.node
            if op_is(user, "Shape") and (user.attributes.get_int("start", 0), user.attributes.get_int("end", 4)) == (2, 3):
                seq = self.add(user, "Shape", [self.graph_input(ids_name)], {"start": 1, "end": 2}, name=f"{user.name}_from_ids")
                user.outputs[0].replace_all_uses_with(seq.outputs[0])

    def bsd(self, before: ir.Node, bnsh: ir.Value, name: str) -> ir.Value:
        """[batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]."""
        transpose = bnsh.producer()
        if op_is(transpose, "Transpose") and ints(transpose, "perm") == [0, 2, 1, 3]:
            reshape = transpose.inputs[0].producer()
            # x [b, s, n * d] viewed as [b, s, n, d] and transposed: x itself is the BSD form.
            # (Shapes are unknown after the fusions; a wrong guess fails the export's probe.)
            if op_is(reshape, "Reshape") and length(reshape.inputs[1]) == 4:
                return reshape.inputs[0]
        moved = self.add(before, "Transpose", [bnsh], {"perm": [0, 2, 1, 3]}, name=f"{name}_bsnh").outputs[0]
        flat = self.constant("gqa_bsd_shape", np.array([0, 0, -1], np.int64))
        return self.add(before, "Reshape", [moved, flat], name=f"{name}_bsd").outputs[0]


def fuse_gqa(model: ir.Model, max_positions: int | None = None, windowed: bool = True) -> int:
    """Rewrite every matching MultiHeadAttention as GroupQueryAttention, in place; returns the
    count. `max_positions` sizes the rotary tables (None: rotary stays in the graph);
    `windowed=False` says the model's config names no attention window, so a bias that probes as
    plain causal + padding may be rebuilt from the mask."""
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

    graph = model.graph
    matches = [m for node in list(graph) if op_is(node, "MultiHeadAttention", MS_DOMAIN) and (m := _match(node))]
    if not matches:
        return 0
    builder = _Builder(graph)
    caches: dict[tuple[int, int], tuple[ir.Value, ir.Value] | None] = {}
    plain: dict[int, bool] = {}
    for i, found in enumerate(matches):
        node = found.node
        seqlens, total, query_seqlens = builder.lengths()
        attrs = {"num_heads": found.heads, "kv_num_heads": found.kv_heads, "do_rotary": 0}
        if "scale" in node.attributes:
            attrs["scale"] = node.attributes.get_float("scale")
        query, new_key, cos_cache, sin_cache = found.query, found.new_key, None, None
        rotary = _rotary_pair(found, max_positions)
        if rotary is not None:
            tables = (id(rotary[2]), id(rotary[3]))
            if tables not in caches:
                computed = patterns.tables(model, rotary[2], rotary[3], max_positions)
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
        packed = patterns.pack_int4([query, key, value]) if cos_cache is not None else None
        if packed is not None:
            weights = [builder.constant(f"gqa{i}_qkv_{part}", array) for part, array in zip(("weight", "scales", "zero_points"), packed[0][1:])]
            qkv = builder.add(node, "MatMulNBits", [packed[0][0], *weights], packed[1], MS_DOMAIN, name=f"gqa{i}_qkv")
            query, key, value = qkv.outputs[0], None, None
        bias = found.bias
        if bias is not None and not windowed:
            if id(bias) not in plain:
                plain[id(bias)] = patterns.plain_causal_bias(model, bias)
            bias = builder.padding_bias() if plain[id(bias)] else bias
        inputs = [query, key, value, found.past_key, found.past_value, seqlens, total, cos_cache, sin_cache, None, bias,
                  None, None, None, None, None, query_seqlens]
        gqa = builder.add(node, "GroupQueryAttention", inputs, attrs, MS_DOMAIN, outputs=3, name=f"{node.name or 'attention'}_gqa")
        out, present_key, present_value = gqa.outputs
        for old, new in ((found.present_key, present_key), (found.present_value, present_value)):
            name, shape, dtype = old.name, old.shape, old.type
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = None
            new.name, new.type = name, dtype
            new.shape = ir.Shape([shape[0], shape[1], ir.SymbolicDim("present_sequence_length"), shape[3]]) if shape is not None else None
        node.outputs[0].replace_all_uses_with(out)
        _skip_reshapes(out)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    RemoveUnusedNodesPass()(model)
    CommonSubexpressionEliminationPass()(model)  # the layers' identical bias expansions
    logger.info("GroupQueryAttention: %d attentions rewritten", len(matches))
    return len(matches)


def _skip_reshapes(out: ir.Value) -> None:
    """`Reshape(Reshape(out, [b, s, h, d]), [b, s, -1])` -> out [b, s, h * d]: MultiHeadAttention's
    output was viewed as heads for the exporter's own flattening, which GroupQueryAttention's
    output already has (a wrong guess fails the export's probe)."""
    uses = out.uses()
    first = uses[0].node if len(uses) == 1 else None
    if not op_is(first, "Reshape") or len(first.outputs[0].uses()) != 1:
        return
    second = first.outputs[0].uses()[0].node
    if op_is(second, "Reshape") and second.inputs[0] is first.outputs[0] and length(second.inputs[1]) == 3 \
            and not second.outputs[0].is_graph_output():
        second.outputs[0].replace_all_uses_with(out)


def merge_int4_siblings(model: ir.Model) -> int:
    """Two or more MatMulNBits of one input with the same attributes (an MLP's gate and up
    projections) -> one MatMulNBits over their concatenated weights and a Split, in place: one
    kernel call instead of several, each output column computed exactly as before. Returns the
    count of merged groups."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    groups: dict[int, list[ir.Node]] = {}
    for node in model.graph:
        if op_is(node, "MatMulNBits", MS_DOMAIN):
            groups.setdefault(id(node.inputs[0]), []).append(node)
    builder = _Builder(model.graph)
    merged = 0
    replaced: list[ir.Value] = []
    for nodes in groups.values():
        packed = patterns.pack_int4([n.outputs[0] for n in nodes]) if len(nodes) > 1 else None
        if packed is None:
            continue
        order = {id(n): i for i, n in enumerate(model.graph)}
        first = min(nodes, key=lambda n: order[id(n)])
        name = f"{first.name or 'matmul'}_merged"
        weights = [builder.constant(f"{name}_{part}", array) for part, array in zip(("weight", "scales", "zero_points"), packed[0][1:])]
        node = builder.add(first, "MatMulNBits", [packed[0][0], *weights], packed[1], MS_DOMAIN, name=name)
        sizes = builder.constant(f"{name}_split", np.array([n.attributes.get_int("N") for n in nodes], np.int64))
        split = builder.add(first, "Split", [node.outputs[0], sizes], {"axis": -1}, outputs=len(nodes), name=f"{name}_split")
        for old, new in zip(nodes, split.outputs):
            old.outputs[0].replace_all_uses_with(new)
            replaced += [value for value in old.inputs[1:] if value is not None and value.is_initializer()]
        merged += 1
    if merged:
        RemoveUnusedNodesPass()(model)
    for value in replaced:  # references outlive the graph (the exporter's): let go of the bytes
        if value.name not in model.graph.initializers:
            value.const_value = None
    return merged


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
            if op_is(user, "GroupQueryAttention", MS_DOMAIN) and use.idx in (3, 4):
                continue
            if not op_is(user, "Shape"):
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


def logits_to_keep_feed(inputs: Collection[str], last: int = 0) -> dict[str, np.ndarray]:
    """The feed that asks a graph with the inputs `inputs` for the logits of its last `last`
    positions (0: every position). A graph that declares `logits_to_keep` must be fed it; one
    without it (the rewrite did not apply, or an artifact from before it was a plain input,
    where it was an initializer of default 0) gets nothing and returns every position."""
    return {LOGITS_TO_KEEP: np.array([last], np.int64)} if LOGITS_TO_KEEP in inputs else {}


def add_logits_to_keep(model: ir.Model) -> bool:
    """Add the `logits_to_keep` input (see the module docstring), in place; False when the
    `logits` output is not a matmul of the hidden states (then the graph is unchanged)."""
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    node = logits.producer() if logits is not None else None
    while node is not None and (node.op_type, node.domain if node.domain != "ai.onnx" else "") not in _HEADS:
        varying = [v for v in node.inputs if v is not None and const(v) is None]
        if node.op_type not in _POSITIONWISE or len(varying) != 1:
            return False
        node = varying[0].producer()
    if node is None:
        return False
    hidden = node.inputs[0]
    keep = ir.Value(name=LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    graph.inputs.append(keep)
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
