"""The rank a low-rank factorization keeps: one rule for the compiler and the training program.

Imports only torch: emit copies this file into the training program's runtime
(`backends/train/shared_modules.py`), so a plan's `lowrank { energy = 90% }` cuts the same
rank at compile time and in training.
"""

from __future__ import annotations

import torch


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """`rank` (capped at the number of singular values), or the smallest r whose singular values
    keep `energy` of sum(s^2), computed in float64 so both sides round alike."""
    full = singular_values.numel()
    if rank is not None:
        return min(rank, full)
    if energy is None:
        raise ValueError("choose_rank needs a rank or an energy")
    power = singular_values.double().pow(2)
    kept = torch.cumsum(power, 0) / power.sum().clamp(min=1e-300)
    # Smallest r with kept[r-1] >= energy (tolerate rounding at energy = 1).
    return min(int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1, full)
