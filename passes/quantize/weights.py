"""Integer weight formats shared by every quantize method, in the layouts of `passes/qops.py`.

A method decides the integer values; the stored tensors (`qweight` + `w_scale` for int8,
`packed` + `scales` (+ `zero_points`) for int4 MatMulNBits) and the ops that read them are the
same whichever method chose them, so the ONNX lowering never needs to know the method.
The scale formulas here are exactly those of `qops.quantize_per_channel_int8` /
`quantize_per_tensor_int8` / `pack_int4`, so that GPTQ with no error to propagate reproduces
round-to-nearest bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import planc.passes.qops as qops


@dataclass(frozen=True)
class WeightFormat:
    """How one Linear weight is stored: scheme, scale granularity and the int8 range."""

    scheme: str  # "int8" | "int4"
    granularity: str  # "per_channel" | "per_tensor" | "per_group"
    group_size: int
    symmetric: bool
    weight_max: int  # int8 only: symmetric values in [-weight_max, weight_max]


@dataclass
class QuantizedWeight:
    """The integer tensors of one weight (keyed as in the rewritten op) and their dequantized value."""

    tensors: dict[str, torch.Tensor]
    w_hat: torch.Tensor


def rtn(w: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest: the method every other one is measured against."""
    w = w.detach().float()
    if fmt.scheme == "int4":
        packed, scales, zero_points = qops.pack_int4(w, fmt.group_size, fmt.symmetric)
        tensors = {"packed": packed, "scales": scales}
        if zero_points is not None:
            tensors["zero_points"] = zero_points
        return QuantizedWeight(tensors, qops.unpack_int4(packed, scales, zero_points, w.shape[1], fmt.group_size))
    if fmt.granularity == "per_tensor":
        q, scale = qops.quantize_per_tensor_int8(w, fmt.weight_max)
    else:
        q, scale = qops.quantize_per_channel_int8(w, fmt.weight_max)
    return QuantizedWeight({"qweight": q, "w_scale": scale}, q.float() * (scale[:, None] if scale.numel() > 1 else scale))


#: Rows per block when a calibrated method rounds block by block (`gptq_by_rows`): bounded
#: temporaries on a real-sized LM head (Llama-3.1-8B's is 128256 x 4096, 2.1 GB in fp32).
RTN_BLOCK_ROWS = 8192
#: Elements per block of round-to-nearest (`rtn_by_rows`): each block's temporaries (4 MB in
#: fp32) stay in the CPU's cache across rounding's passes over them, 2-4x faster than 8192-row
#: blocks on 2048- and 14336-wide weights (and bounded on any LM head).
RTN_BLOCK_ELEMENTS = 1 << 20


def rtn_by_rows(w: torch.Tensor, fmt: WeightFormat) -> tuple[dict[str, torch.Tensor], float]:
    """`rtn`'s integer tensors and its max |w - w_hat|, computed block by block over rows (int4
    groups and int8 per-channel scales never cross a row; a per-tensor scale does: one block)."""
    by_rows = fmt.scheme == "int4" or fmt.granularity == "per_channel"
    rows = max(1, RTN_BLOCK_ELEMENTS // max(1, w.shape[1])) if by_rows else w.shape[0]
    parts: list[dict[str, torch.Tensor]] = []
    error = 0.0
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows].detach().float()
        if fmt.scheme == "int4":  # no dequantized copy: the error comes with the codes
            packed, scales, zero_points, block_error = qops.pack_int4_with_error(block, fmt.group_size, fmt.symmetric)
            parts.append({"packed": packed, "scales": scales, **({} if zero_points is None else {"zero_points": zero_points})})
        else:
            quantized = rtn(block, fmt)
            parts.append(quantized.tensors)
            block_error = float((block - quantized.w_hat).abs().max())
        error = max(error, block_error)
    if len(parts) == 1:
        return parts[0], error
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}, error


def int8_scales(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Per-row scales [out] (a per-tensor scale repeated), as round-to-nearest computes them."""
    if fmt.granularity == "per_tensor":
        return qops.quantize_per_tensor_int8(w, fmt.weight_max)[1].expand(w.shape[0]).clone()
    return qops.quantize_per_channel_int8(w, fmt.weight_max)[1]


def int4_params(group: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [out], zero point [out] as float codes) of one group of columns [out, <= group_size],
    as `qops.pack_int4` derives them (symmetric: the implicit zero point 8)."""
    if symmetric:
        amax = group.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        return scale, torch.full_like(scale, 8.0)
    lo = group.amin(dim=1).clamp(max=0.0)
    hi = group.amax(dim=1).clamp(min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    return scale, torch.clamp(torch.round(-lo / scale), 0, 15)


def int4_codes(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """4-bit codes (as floats in [0, 15]) of one column, given its group's scale and zero point."""
    if symmetric:
        return torch.clamp(torch.round(column / scale), -8, 7) + 8
    return torch.clamp(torch.round(column / scale) + zero, 0, 15)


def pack_int4_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """MatMulNBits tensors from codes [out, in] and per-group scales / zero points [out, n_blocks].

    The same bytes `qops.pack_int4` writes; padded columns hold the zero point (value 0).
    """
    n_out, k = codes.shape
    n_blocks, k_pad = qops.int4_layout(k, fmt.group_size)
    padding = zeros.repeat_interleave(fmt.group_size, dim=1)[:, k:k_pad]
    q = torch.cat([codes, padding], dim=1).reshape(n_out, n_blocks, fmt.group_size).to(torch.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
    tensors = {"packed": packed, "scales": scales.reshape(-1).contiguous().float()}
    zero_points = None
    if not fmt.symmetric:
        zp = zeros.to(torch.uint8)
        if n_blocks % 2:
            zp = torch.nn.functional.pad(zp, (0, 1))
        zero_points = (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1).contiguous()
        tensors["zero_points"] = zero_points
    w_hat = qops.unpack_int4(packed, tensors["scales"], zero_points, k, fmt.group_size)
    return QuantizedWeight(tensors, w_hat)

