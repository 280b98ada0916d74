"""`planc::linear_clustered`: a Linear whose weight is a codebook lookup, with its index layout.

The cluster pass stores each weight as packed indices and a float codebook, and this op
rebuilds the weight from them, so the graph (and the ONNX file, `backends/onnx/cluster_lowering.py`)
carries `bits` bits per weight instead of 32. Like the ops of `passes/qops.py` it has a reference
CPU kernel and a fake kernel, so `torch.export` and the dynamo ONNX exporter see one opaque node.

Layout of `linear_clustered(Tensor x, Tensor indices, Tensor codebook, int in_features, int bits,
Tensor? bias) -> Tensor`:
- each index occupies a slot of `slot_bits(bits)` bits (1, 2, 4 or 8), `8 / slot` slots per byte,
  the lowest bits holding the first (for 4-bit slots: the low nibble holds the even column,
  as in MatMulNBits);
- `indices`: uint8 [out, ceil(in_features * slot / 8)], row-major; padding slots hold 0;
- `codebook`: fp32 [out, 2^bits] (one codebook per output channel) or [1, 2^bits] (one for the
  whole weight);
- `w[o, i] = codebook[o or 0, index[o, i]]`, then `y = x @ w^T + bias`.

Importing this module registers the op.
"""

from __future__ import annotations

import math

import torch

__all__ = ["linear_clustered", "slot_bits", "pack_indices", "unpack_indices", "clustered_weight"]


def slot_bits(bits: int) -> int:
    """Width of the slot an index of `bits` bits is stored in: the next of 1, 2, 4, 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cluster indices have 1 to 8 bits, got {bits}")
    return next(slot for slot in (1, 2, 4, 8) if slot >= bits)


def pack_indices(index: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, ceil(n * slot / 8)] from indices [rows, n] in [0, 2^bits)."""
    slot = slot_bits(bits)
    per_byte = 8 // slot
    rows, n = index.shape
    padded = torch.nn.functional.pad(index.to(torch.int32), (0, math.ceil(n / per_byte) * per_byte - n))
    groups = padded.reshape(rows, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * slot
    return (groups << shifts).sum(dim=-1).to(torch.uint8).contiguous()


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int64 indices [rows, n] from the packed layout."""
    slot = slot_bits(bits)
    per_byte = 8 // slot
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * slot
    parts = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << slot) - 1)
    return parts.reshape(packed.shape[0], -1)[:, :n].long()


def clustered_weight(indices: torch.Tensor, codebook: torch.Tensor, in_features: int, bits: int) -> torch.Tensor:
    """The fp32 weight [out, in_features] the layout describes."""
    index = unpack_indices(indices, bits, in_features)
    table = codebook.float().expand(index.shape[0], -1)
    return torch.gather(table, 1, index)


@torch.library.custom_op(
    "planc::linear_clustered",
    mutates_args=(),
    schema="(Tensor x, Tensor indices, Tensor codebook, int in_features, int bits, Tensor? bias) -> Tensor",
)
def linear_clustered(
    x: torch.Tensor,
    indices: torch.Tensor,
    codebook: torch.Tensor,
    in_features: int,
    bits: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    w = clustered_weight(indices, codebook, in_features, bits)
    y = torch.matmul(x.float(), w.t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@linear_clustered.register_fake
def _(x, indices, codebook, in_features, bits, bias):
    return x.new_empty((*x.shape[:-1], indices.shape[0]))
