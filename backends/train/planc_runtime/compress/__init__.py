"""Compression applied to the student before (and kept through) training.

units         remove whole heads and MLP channels, found in the traced graph (../structure.py)
structured    remove whole blocks; Shrink records what went, and dense_state_dict lays the
              trained weights back out at the original size
calibration   activation importance and least-squares refits, measured on training text
layers        trainable replacements of Linears: LowRankLinear, FakeQuantLinear
masks         unstructured / N:M pruning masks kept through training: PruneMasks
regularize    group lasso on heads / channels, L1 on weights, while training: regularizer
"""

from __future__ import annotations

from .calibration import calibration_batches, example_batch, input_gram, output_energy, refit_columns, refit_weight
from .layers import FakeQuantLinear, LowRankLinear, factor_low_rank, fake_quantize, straight_through
from .masks import PruneMasks, linear_weights
from .regularize import GroupLasso, WeightL1, regularizer
from .structured import Cut, Shrink, dense_state_dict, drop_blocks
from .units import shrink_attention_heads, shrink_mlp_channels

__all__ = [
    "Cut",
    "FakeQuantLinear",
    "GroupLasso",
    "LowRankLinear",
    "PruneMasks",
    "Shrink",
    "WeightL1",
    "calibration_batches",
    "dense_state_dict",
    "drop_blocks",
    "example_batch",
    "factor_low_rank",
    "fake_quantize",
    "input_gram",
    "linear_weights",
    "output_energy",
    "refit_columns",
    "refit_weight",
    "regularizer",
    "shrink_attention_heads",
    "shrink_mlp_channels",
    "straight_through",
]
