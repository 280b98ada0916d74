"""The partition pass: pipeline stages of balanced cost (`split.py`).

This module is the pass's option model (torch-free, so `planc check` stays light).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from planc.passes.options import PassOptions

class Partition(PassOptions):
    """Cut the model into pipeline stages of balanced cost with torch.fx's split_module."""

    name: ClassVar[str] = "partition"
    impl: ClassVar[str] = "planc.passes.partition.split:PartitionPass"
    default_types: ClassVar[tuple[str, ...]] = ()
    stages: int = Field(2, ge=2)
    balance: Literal["params", "flops", "time"] = "params"
    #: Cut only between repeated blocks (transformer layers) or between any two nodes.
    boundary: Literal["blocks", "nodes"] = "blocks"
