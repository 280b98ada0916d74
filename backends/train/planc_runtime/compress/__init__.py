"""Compression applied to the student before (and kept through) training.

structured    remove whole heads, MLP channels and blocks (Shrink records what went), and lay
              the trained weights back out at the original size (dense_state_dict)
calibration   activation importance and least-squares refits, measured on training text
layers        trainable replacements of Linears: LowRankLinear, FakeQuantLinear
masks         unstructured / N:M pruning masks kept through training: PruneMasks
"""

from __future__ import annotations

from .calibration import calibration_batches, input_gram, output_energy, refit_columns
from .layers import FakeQuantLinear, LowRankLinear, factor_low_rank, fake_quantize, straight_through
from .masks import PruneMasks, linear_weights
from .structured import (
    ATTENTION_LAYOUTS,
    HEAD_DIM_ATTRS,
    MLP_LAYOUTS,
    Shrink,
    dense_state_dict,
    drop_blocks,
    shrink_attention_heads,
    shrink_mlp_channels,
)

__all__ = [
    "ATTENTION_LAYOUTS",
    "FakeQuantLinear",
    "HEAD_DIM_ATTRS",
    "LowRankLinear",
    "MLP_LAYOUTS",
    "PruneMasks",
    "Shrink",
    "calibration_batches",
    "dense_state_dict",
    "drop_blocks",
    "factor_low_rank",
    "fake_quantize",
    "input_gram",
    "linear_weights",
    "output_energy",
    "refit_columns",
    "shrink_attention_heads",
    "shrink_mlp_channels",
    "straight_through",
]
