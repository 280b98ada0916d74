"""The lowrank pass: a Linear becomes two of rank r (truncated SVD, `factorize.py`).

This module is the pass's option model (torch-free, so `planc check` stays light).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from planc.passes.options import PassOptions

class LowRank(PassOptions):
    """Factor a Linear W (out x in) into two Linears of rank r via truncated SVD."""

    name: ClassVar[str] = "lowrank"
    impl: ClassVar[str] = "planc.passes.lowrank.factorize:LowRankPass"
    rank: int | None = Field(None, ge=1)
    #: Keep the smallest rank whose singular values hold this fraction of the energy (sum s^2).
    energy: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_of_rank_or_energy(self) -> LowRank:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("lowrank needs exactly one of 'rank' or 'energy'")
        return self
