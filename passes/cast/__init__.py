"""The cast pass: part of the model in fp16/bf16, fragile ops kept fp32 (`convert.py`).

This module is the pass's option model (torch-free, so `planc check` stays light).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from planc.passes.options import PassOptions

class Cast(PassOptions):
    """Run the selected part of the model in fp16/bf16, keeping numerically fragile ops in fp32."""

    name: ClassVar[str] = "cast"
    impl: ClassVar[str] = "planc.passes.cast.convert:CastPass"
    default_types: ClassVar[tuple[str, ...]] = ()  # no selector: the whole model
    dtype: Literal["fp16", "bf16"] = "fp16"
    #: Op kinds kept in fp32; casts are inserted only at the boundaries.
    keep_fp32: list[Literal["layernorm", "softmax", "embedding", "loss", "pooling"]] = Field(
        default_factory=lambda: ["layernorm", "softmax"]
    )
