"""Quantized linear/embedding ops (`torch.ops.planc.*`) that carry real integer weights.

The quantize pass replaces `aten.linear` nodes with these ops; the weights they take are
int8/uint8 buffers of the GraphModule, so the fp32 weights really leave the model. Each op has
a reference CPU kernel (numerics below) and a fake kernel, so `torch.export` and
`torch.onnx.export(dynamo=True)` trace them as single opaque nodes that a backend maps to
ONNX / ONNX Runtime operators. Importing this module registers the ops.

Ops and layouts
---------------
1. `planc::linear_int8_dynamic(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias,
   bool saturate=False) -> Tensor`
   - `qweight`: int8 [out, in], symmetric (zero point 0), values in [-127, 127] (or the 7-bit
     [-63, 63] of a target CPU whose kernels saturate, see `passes/cpu.py`).
   - `w_scale`: fp32 [out] (per output channel) or [1] (per tensor); `w = qweight * w_scale`.
   - Numerics mirror ONNX Runtime's `DynamicQuantizeLinear` + `MatMulInteger`: `x` is quantized
     at run time to uint8, asymmetric, per tensor, with
     `x_scale = (max(0, max x) - min(0, min x)) / 255`,
     `x_zp = clamp(round(-min(0, min x) / x_scale), 0, 255)`,
     `xq = clamp(round(x / x_scale) + x_zp, 0, 255)` (round half to even);
     then `y = ((xq - x_zp) @ qweight^T) * (x_scale * w_scale) + bias` with an exact integer
     accumulation (done in float64, exact for any realistic `in`).
   - `saturate = True` models the target CPU's arithmetic where ONNX Runtime's u8 x s8 kernels
     saturate each pair of products to int16 (AVX2 without VNNI):
     `acc = sum_{k even} sat16(xq[k] w[k] + xq[k+1] w[k+1]) - x_zp * sum_k w[k]`. With 7-bit
     weights no pair can saturate, and the result equals the exact one.
2. `planc::linear_int8_static(Tensor x, float x_scale, int x_zero_point, Tensor qweight,
   Tensor w_scale, Tensor? bias, bool saturate=False) -> Tensor`
   - as 1., but `x` is quantized with the calibrated, fixed `x_scale` / `x_zero_point` (uint8),
     i.e. ONNX `QuantizeLinear` + `MatMulInteger`.
3. `planc::linear_int4(Tensor x, Tensor packed, Tensor scales, Tensor? zero_points,
   int in_features, int group_size, Tensor? bias) -> Tensor`, weight-only; exactly the layout of
   ONNX Runtime's `com.microsoft::MatMulNBits` with bits=4, K=in_features, N=out,
   block_size=group_size, n_blocks = ceil(K / group_size):
   - `packed`: uint8 [N, n_blocks, group_size / 2]; element k of a block sits in byte k // 2,
     the low nibble holding the even element, the high nibble the odd one. K is padded with
     zeros up to n_blocks * group_size.
   - `scales`: fp32 [N * n_blocks] (row-major over (n, block)).
   - `zero_points`: uint8 [N * ceil(n_blocks / 2)], two 4-bit zero points per byte (low nibble
     = even block) per row; None means symmetric with the implicit zero point 8.
   - dequantized weight `w[n, k] = (q[n, k] - zp[n, k // group_size]) * scale[n, k // group_size]`,
     then `y = x @ w^T + bias`.
4. `planc::embedding_int8(Tensor ids, Tensor qweight, Tensor scale) -> Tensor`
   - `qweight`: int8 [num_embeddings, dim], symmetric per row; `scale`: fp32 [num_embeddings];
     `y = qweight[ids] * scale[ids, None]` (fp32).

Python helpers (used by the quantize pass and its tests): `quantize_per_channel_int8`,
`quantize_per_tensor_int8`, `pack_int4`, `unpack_int4`, `quantize_activation_params`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "linear_int8_dynamic",
    "linear_int8_static",
    "linear_int4",
    "embedding_int8",
    "quantize_per_channel_int8",
    "quantize_per_tensor_int8",
    "quantize_activation_params",
    "integer_accumulate",
    "pack_int4",
    "unpack_int4",
    "int4_layout",
]

_INT8_MAX = 127
_INT16_MIN, _INT16_MAX = -32768, 32767
#: Rows of activations per chunk of the saturating product (bounds its [rows, out, in/2] buffer).
_SAT_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- helpers


def quantize_per_channel_int8(w: torch.Tensor, weight_max: int = _INT8_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row in [-weight_max, weight_max]: (q int8 [out, in], scale fp32 [out])."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / weight_max, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -weight_max, weight_max).to(torch.int8)
    return q, scale.float()


def quantize_per_tensor_int8(w: torch.Tensor, weight_max: int = _INT8_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale, in [-weight_max, weight_max]: (q int8 like w, scale fp32 [1])."""
    w = w.detach().float()
    amax = w.abs().amax()
    scale = amax / weight_max if amax > 0 else torch.tensor(1.0)
    q = torch.clamp(torch.round(w / scale), -weight_max, weight_max).to(torch.int8)
    return q, scale.reshape(1).float()


def integer_accumulate(xq: torch.Tensor, x_zero_point: torch.Tensor | float, qweight: torch.Tensor, saturate: bool) -> torch.Tensor:
    """int32-valued `(xq - zp) @ qweight^T` (as float64), exact or as a saturating u8 x s8 kernel sums.

    `xq` holds raw uint8 values (zero point not subtracted), `qweight` is int8 [out, in].
    `saturate` follows `passes/cpu.py`: each pair of products along `in` is clamped to int16
    before the int32 sum, and the zero point's share `zp * sum_k w[k]` is subtracted after.
    """
    zp = float(x_zero_point)
    if not saturate or _pairs_cannot_saturate(qweight):
        # Integer products summed in float64 are exact (|sum| < 2^53), like MatMulInteger's int32.
        return torch.matmul(xq.double() - zp, qweight.double().t())
    rows = xq.reshape(-1, xq.shape[-1]).to(torch.int32)
    w = qweight.to(torch.int32)
    if rows.shape[1] % 2:
        rows = torch.nn.functional.pad(rows, (0, 1))
        w = torch.nn.functional.pad(w, (0, 1))
    n_out, k = w.shape
    pairs_w = w.reshape(n_out, k // 2, 2)
    chunk = max(1, _SAT_CHUNK_ELEMENTS // max(1, n_out * k // 2))
    out = []
    for start in range(0, rows.shape[0], chunk):
        pairs_a = rows[start : start + chunk].reshape(-1, 1, k // 2, 2)
        pair_sums = (pairs_a * pairs_w.unsqueeze(0)).sum(-1).clamp(_INT16_MIN, _INT16_MAX)
        out.append(pair_sums.sum(-1).double())
    acc = torch.cat(out) - zp * w.sum(dim=1).double()
    return acc.reshape(*xq.shape[:-1], n_out)


def _pairs_cannot_saturate(qweight: torch.Tensor) -> bool:
    """Whether no pair of adjacent weights can push a u8 x s8 pair sum past int16."""
    w = qweight.to(torch.int32).abs()
    if w.shape[-1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    worst = int(w.reshape(w.shape[0], -1, 2).sum(-1).max()) if w.numel() else 0
    return 255 * worst <= _INT16_MAX


def quantize_activation_params(x_min: float, x_max: float) -> tuple[float, int]:
    """uint8 asymmetric (scale, zero_point) for an observed range, as ONNX Runtime computes it.

    The range is widened to include 0 so that 0 (padding, ReLU zeros) is exact.
    """
    lo, hi = min(0.0, float(x_min)), max(0.0, float(x_max))
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return 1.0, 0
    zero_point = int(min(255, max(0, round(-lo / scale))))
    return float(scale), zero_point


def int4_layout(in_features: int, group_size: int) -> tuple[int, int]:
    """(n_blocks, padded K) of the MatMulNBits layout for K = in_features."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be an even number >= 2, got {group_size}")
    n_blocks = math.ceil(in_features / group_size)
    return n_blocks, n_blocks * group_size


def pack_int4(
    w: torch.Tensor, group_size: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group-wise 4-bit quantization of w [N, K] in MatMulNBits layout.

    Symmetric: `scale = amax / 7`, `q = clamp(round(w / scale), -8, 7) + 8` (zero point 8, not
    stored). Asymmetric: the group's range widened to include 0, `scale = (max - min) / 15`,
    `zp = round(-min / scale)`, `q = clamp(round(w / scale) + zp, 0, 15)`.
    Either way every element satisfies `|w - w_hat| <= scale / 2`.
    Returns (packed uint8 [N, n_blocks, group_size/2], scales fp32 [N*n_blocks],
    zero_points uint8 [N*ceil(n_blocks/2)] or None).
    """
    packed, scales, zero_points, _ = pack_int4_with_error(w, group_size, symmetric)
    return packed, scales, zero_points


def pack_int4_with_error(
    w: torch.Tensor, group_size: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """`pack_int4`'s tensors and max |w - w_hat|, without dequantizing: one fp32 temporary
    the size of `w`, rounded in place (a real-sized model's weights are quantized in seconds)."""
    if w.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D weight, got shape {tuple(w.shape)}")
    n_out, k = w.shape
    n_blocks, k_pad = int4_layout(k, group_size)
    w = w.detach().float()
    if k_pad != k:
        w = torch.nn.functional.pad(w, (0, k_pad - k))
    groups = w.reshape(n_out, n_blocks, group_size)
    if symmetric:
        amax = groups.abs().amax(dim=2)
        scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        q = groups / scale[..., None]
        q.round_().clamp_(-8, 7)
        error = float(torch.mul(q, scale[..., None]).sub_(groups).abs_().max())  # |w_hat - w|
        q.add_(8)
        zp = None
    else:
        lo = groups.amin(dim=2).clamp(max=0.0)
        hi = groups.amax(dim=2).clamp(min=0.0)
        scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
        zp = torch.clamp(torch.round(-lo / scale), 0, 15)
        q = groups / scale[..., None]
        q.round_().add_(zp[..., None]).clamp_(0, 15)
        error = float(q.sub(zp[..., None]).mul_(scale[..., None]).sub_(groups).abs_().max())
    q = q.to(torch.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
    scales = scale.reshape(-1).contiguous().float()
    if zp is None:
        return packed, scales, None, error
    zp = zp.to(torch.uint8)
    if n_blocks % 2:
        zp = torch.nn.functional.pad(zp, (0, 1))
    zero_points = (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1).contiguous()
    return packed, scales, zero_points, error


def unpack_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """Dequantized fp32 weight [N, in_features] from the MatMulNBits layout (see module doc)."""
    n_out, n_blocks, half = packed.shape
    if half * 2 != group_size:
        raise ValueError(f"packed blob of {half} bytes does not match group_size {group_size}")
    low = (packed & 0x0F).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    q = torch.stack([low, high], dim=-1).reshape(n_out, n_blocks, group_size)
    if zero_points is None:
        zp = torch.full((n_out, n_blocks), 8, dtype=torch.int16, device=packed.device)
    else:
        zp_bytes = zero_points.reshape(n_out, -1)
        zp = torch.stack([zp_bytes & 0x0F, zp_bytes >> 4], dim=-1).reshape(n_out, -1)[:, :n_blocks]
        zp = zp.to(torch.int16)
    scale = scales.float().reshape(n_out, n_blocks)
    w = (q - zp[..., None]).float() * scale[..., None]
    return w.reshape(n_out, n_blocks * group_size)[:, :in_features]


def _integer_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor | float,
    x_zero_point: torch.Tensor | int,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    saturate: bool = False,
) -> torch.Tensor:
    """y = ((xq - zp) @ qweight^T) * x_scale * w_scale + bias, x quantized to uint8."""
    xf = x.float()
    xq = torch.clamp(torch.round(xf / x_scale) + x_zero_point, 0, 255)
    acc = integer_accumulate(xq, x_zero_point, qweight, saturate).float()
    y = acc * (x_scale * w_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _out_shape(x: torch.Tensor, n_out: int) -> tuple:
    return (*x.shape[:-1], n_out)


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op(
    "planc::linear_int8_dynamic",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, bool saturate=False) -> Tensor",
)
def linear_int8_dynamic(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, saturate: bool = False
) -> torch.Tensor:
    xf = x.float()
    lo = torch.clamp(xf.min(), max=0.0)
    hi = torch.clamp(xf.max(), min=0.0)
    x_scale = (hi - lo) / 255.0
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    x_zero_point = torch.clamp(torch.round(-lo / x_scale), 0, 255)
    return _integer_linear(x, x_scale, x_zero_point, qweight, w_scale, bias, saturate)


@linear_int8_dynamic.register_fake
def _(x, qweight, w_scale, bias, saturate=False):
    return x.new_empty(_out_shape(x, qweight.shape[0]))


@torch.library.custom_op(
    "planc::linear_int8_static",
    mutates_args=(),
    schema=(
        "(Tensor x, float x_scale, int x_zero_point, Tensor qweight, Tensor w_scale, Tensor? bias,"
        " bool saturate=False) -> Tensor"
    ),
)
def linear_int8_static(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    saturate: bool = False,
) -> torch.Tensor:
    return _integer_linear(x, float(x_scale), int(x_zero_point), qweight, w_scale, bias, saturate)


@linear_int8_static.register_fake
def _(x, x_scale, x_zero_point, qweight, w_scale, bias, saturate=False):
    return x.new_empty(_out_shape(x, qweight.shape[0]))


@torch.library.custom_op(
    "planc::linear_int4",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor packed, Tensor scales, Tensor? zero_points, int in_features,"
        " int group_size, Tensor? bias) -> Tensor"
    ),
)
def linear_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    w = unpack_int4(packed, scales, zero_points, in_features, group_size)
    wide = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for the precision search
    y = torch.matmul(x.to(wide), w.to(wide).t())
    if bias is not None:
        y = y + bias.to(wide)
    return y.to(x.dtype)


@linear_int4.register_fake
def _(x, packed, scales, zero_points, in_features, group_size, bias):
    return x.new_empty(_out_shape(x, packed.shape[0]))


@torch.library.custom_op(
    "planc::embedding_int8",
    mutates_args=(),
    schema="(Tensor ids, Tensor qweight, Tensor scale) -> Tensor",
)
def embedding_int8(ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = qweight[ids].float()
    return rows * scale.float().reshape(-1)[ids].unsqueeze(-1)


@embedding_int8.register_fake
def _(ids, qweight, scale):
    return torch.empty((*ids.shape, qweight.shape[1]), dtype=torch.float32, device=ids.device)
