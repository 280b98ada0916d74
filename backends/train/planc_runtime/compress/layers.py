"""Trainable replacements of Linear layers: low-rank factors and fake quantization (QAT).

LowRankLinear, factor_low_rank        W ~= up @ down, initialized by truncated SVD
FakeQuantLinear, fake_quantize        int8/int4 quantize-dequantize in the forward pass,
                                      gradients straight through (straight_through)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import _module, _replace
from ..ranks import choose_rank


class LowRankLinear(nn.Module):
    """W (out x in) ~= up @ down with rank r, initialized from the truncated SVD of W."""

    def __init__(self, linear: nn.Linear, rank: int | None, energy: float | None):
        super().__init__()
        weight = linear.weight.detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        rank = choose_rank(s, rank, energy)
        root = s[:rank].sqrt()
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(root[:, None] * vh[:rank])
            self.up.weight.copy_(u[:, :rank] * root[None, :])
            if linear.bias is not None:
                self.up.bias.copy_(linear.bias)
        self.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def factor_low_rank(model: nn.Module, paths: Sequence[str], rank: int | None = None, energy: float | None = None) -> None:
    """Replace each selected Linear by a trainable LowRankLinear."""
    for path in paths:
        linear = _module(model, path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"lowrank applies to Linear layers; {path} is a {type(linear).__name__}")
        _replace(model, path, LowRankLinear(linear, rank, energy))


def _fake_quant(x: torch.Tensor, bits: int, symmetric: bool, dim: int | None, group: int | None) -> torch.Tensor:
    """Quantize-dequantize `x` to `bits` (per tensor, per row `dim=1` reductions, or per group)."""
    shape = x.shape
    if group is not None:
        x = x.reshape(-1, group)
    reduce = dict(dim=-1, keepdim=True) if (dim is not None or group is not None) else {}
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.detach().abs().amax(**reduce).clamp(min=1e-8) / qmax
        q = (x / scale).round().clamp(-qmax - 1, qmax) * scale
    else:
        qmax = 2**bits - 1
        low, high = x.detach().amin(**reduce), x.detach().amax(**reduce)
        scale = ((high - low) / qmax).clamp(min=1e-8)
        zero = (-low / scale).round()
        q = ((x / scale).round() + zero).clamp(0, qmax).sub(zero) * scale
    return q.reshape(shape)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward the quantized value, backward the identity (straight-through estimator)."""
    return x + (quantized - x).detach()


class FakeQuantLinear(nn.Linear):
    """A Linear trained quantization-aware: weights (and, unless weight-only, activations) are
    quantized-dequantized in the forward pass and gradients pass straight through.

    It takes over the original Linear's parameters, so names and state-dict keys are unchanged.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "int8", mode: str = "dynamic",
                    granularity: str = "per_channel", group_size: int = 32, symmetric: bool = True) -> FakeQuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.bits = 4 if scheme == "int4" else 8
        new.mode, new.granularity, new.group_size, new.symmetric = mode, granularity, group_size, symmetric
        if granularity == "per_group" and linear.in_features % group_size:
            raise ValueError(f"in_features {linear.in_features} is not a multiple of group_size {group_size}")
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        dim = 1 if self.granularity == "per_channel" else None
        group = self.group_size if self.granularity == "per_group" else None
        weight = straight_through(weight, _fake_quant(weight, self.bits, self.symmetric, dim, group))
        if self.mode != "weight_only":  # activations: 8-bit, asymmetric, range of this batch
            x = straight_through(x, _fake_quant(x, 8, False, None, None))
        return F.linear(x, weight, self.bias)


def fake_quantize(model: nn.Module, paths: Sequence[str], **options: Any) -> None:
    """Swap each selected Linear for a FakeQuantLinear sharing its parameters."""
    for path in paths:
        linear = _module(model, path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"quantize applies to Linear layers; {path} is a {type(linear).__name__}")
        _replace(model, path, FakeQuantLinear.from_linear(linear, **options))
