"""ONNX lowering of `planc::linear_clustered` (`passes/cluster/ops.py`) and what ORT makes of it.

1. `linear_clustered(x, indices, codebook, in, bits, bias)` ->
   `MatMul(x, Lookup(Cast(Transpose(Unpack(indices)))))  [+ bias]` where `Unpack` splits each
   byte into its `8 / slot` index slots (`BitShift` right by 0, slot, 2 slot, ... then
   `BitwiseAnd` with the slot mask, reshaped to [out, in]) and `Lookup` is
   `GatherElements(codebook^T, index^T, axis=0)` for per-channel codebooks, or `Gather` of the
   flattened codebook for a per-tensor one, giving W^T [in, out]. The indices are transposed and
   widened (to int32, GatherElements' narrowest index type) before the lookup, not the fp32
   weight after it, which keeps the temporaries of a rebuild small. The file thus keeps
   `bits`-wide indices (in their 1/2/4/8-bit slots) and the fp32 codebooks, never the fp32
   weight, except for layers so small (at most 8192 index bytes) that the exporter's own
   constant folder rebuilds them (onnxscript's input size limit).
2. ONNX Runtime has no kernel that multiplies by a codebook lookup, and its `ConstantFolding`
   evaluates every node whose inputs are all initializers: when a session loads such a graph
   it rebuilds each weight once and keeps the fp32 result, so in memory a clustered Linear costs
   what an fp32 one does (measured per artifact, `load_expansion`). The artifact builder saves
   its optimized graph with constant folding off (`SAVE_DISABLED_OPTIMIZERS`), so the file on
   disk stays compact and the fold happens at each load.

The bias stays a separate `Add` so ORT's fusions can absorb it as they absorb fp32 biases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir
from onnxscript import opset18 as op

from planc.passes.cluster.ops import slot_bits

#: The ORT optimizer left out when the artifact's optimized graph is saved: folding would write
#: every rebuilt fp32 weight into the file.
SAVE_DISABLED_OPTIMIZERS = ("ConstantFolding",)

#: Ops of the index unpacking and lookup (those ORT folds away at load).
LOOKUP_OPS = frozenset({"BitShift", "BitwiseAnd", "GatherElements"})


def _static_dim(value: Any, axis: int) -> int:
    shape = getattr(value, "shape", None)
    if shape is None or not isinstance(shape[axis], int):
        raise ValueError(f"clustered weight {getattr(value, 'name', value)!r} needs a static shape to be exported")
    return int(shape[axis])


def _unpacked_t(indices: Any, n_out: int, in_features: int, bits: int) -> Any:
    """int32 indices [in, out] (transposed) from the packed uint8 layout [out, bytes]."""
    slot = slot_bits(bits)
    per_byte = 8 // slot
    slots = indices
    if per_byte > 1:
        shifts = op.Constant(value=ir.tensor([slot * j for j in range(per_byte)], dtype=ir.DataType.UINT8))
        mask = op.Constant(value=ir.tensor((1 << slot) - 1, dtype=ir.DataType.UINT8))
        parts = op.BitShift(op.Unsqueeze(indices, op.Constant(value_ints=[-1])), shifts, direction="RIGHT")
        slots = op.Reshape(op.BitwiseAnd(parts, mask), op.Constant(value_ints=[n_out, -1]))
    if _static_dim(indices, 1) * per_byte != in_features:
        slots = op.Slice(slots, op.Constant(value_ints=[0]), op.Constant(value_ints=[in_features]), op.Constant(value_ints=[1]))
    return op.Cast(op.Transpose(slots, perm=[1, 0]), to=ir.DataType.INT32)


def linear_clustered(
    x: Any,
    indices: Any,
    codebook: Any,
    in_features: int = 0,
    bits: int = 4,
    bias: Any | None = None,
) -> Any:
    n_out = _static_dim(indices, 0)
    index_t = _unpacked_t(indices, n_out, int(in_features), int(bits))
    if _static_dim(codebook, 0) == n_out:
        weight_t = op.GatherElements(op.Transpose(codebook, perm=[1, 0]), index_t, axis=0)
    else:
        weight_t = op.Gather(op.Reshape(codebook, op.Constant(value_ints=[-1])), index_t, axis=0)
    y = op.MatMul(x, weight_t)
    return y if bias is None else op.Add(y, bias)


def clustered_bits(gm: Any) -> int | None:
    """The narrowest index width of the `linear_clustered` ops in `gm` (None when it has none)."""
    import torch

    import planc.passes.cluster.ops  # noqa: F401  (registers torch.ops.planc.linear_clustered)

    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    widths = [
        int(node.args[4])
        for graph in graphs
        for node in graph.nodes
        if node.op == "call_function" and node.target == torch.ops.planc.linear_clustered.default
    ]
    return min(widths) if widths else None


def embedding_scheme(gm: Any) -> str | None:
    """The table format `quantize_embeddings` uses beside clustered Linears: int4 when their
    indices are 4 bits or fewer (the embeddings then cost what the Linears do), else int8."""
    bits = clustered_bits(gm)
    return None if bits is None else ("int4" if bits <= 4 else "int8")


def _weights(path: Path) -> tuple[int, int]:
    """(codebook lookups, initializer bytes) of an ONNX file. A lookup is a `Gather` or
    `GatherElements` computed from initializers alone (a weight rebuilt from its indices, which a
    constant folder can evaluate), unlike an embedding's Gather of run-time ids."""
    import onnx

    model = onnx.load(str(path))
    constant = {i.name for i in model.graph.initializer} | {""}
    lookups = 0
    for node in model.graph.node:  # ONNX nodes are stored in topological order
        if all(name in constant for name in node.input):
            constant.update(node.output)
            lookups += node.op_type in ("Gather", "GatherElements")
    size = sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    return lookups, size


def load_expansion(model: Path, providers: list[str], threads: int, level: str, work: Path) -> dict[str, Any]:
    """What ONNX Runtime keeps in memory when it loads `model`: the graph a session builds at the
    artifact's optimization level is saved and compared with the file (lookups and weight bytes)."""
    from planc.backends.onnx import runtime

    as_loaded = work / "as_loaded.onnx"
    runtime.create_session(model, providers, threads, level, optimized_path=as_loaded, external_data=True)
    file_lookups, file_bytes = _weights(model)
    loaded_lookups, loaded_bytes = _weights(as_loaded)
    return {
        "storage": "packed indices + fp32 codebooks",
        "lookups_in_file": file_lookups,
        "lookups_after_load": loaded_lookups,
        "weight_bytes_in_file": file_bytes,
        "weight_bytes_after_load": loaded_bytes,
        "expanded_at_load": loaded_lookups < file_lookups,
    }
