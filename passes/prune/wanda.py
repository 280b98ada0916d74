"""`prune { method = wanda }` (Sun et al. 2023): score |W_ij| * ||X_j||_2, pruned within each
output row (or within each group of `m` inputs of a row for `structure = nm`); no weight update.

||X_j||_2 is the norm of input channel j over every calibration token, measured block by block
on the already pruned model (`passes/prune/calibrated.py`).
"""

from __future__ import annotations

import torch

from planc.passes.calibration import InputStats
from planc.passes.prune.calibrated import CalibratedPrunePass, drop_smallest


def wanda_mask(w: torch.Tensor, norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask of w [out, in], True where the weight is pruned."""
    score = w.abs().float() * norms.float()[None, :]
    if nm is None:
        return drop_smallest(score, round(sparsity * w.shape[1]))
    n, m = nm
    groups = score.reshape(w.shape[0] * w.shape[1] // m, m)
    return drop_smallest(groups, m - n).reshape(w.shape)


class WandaPass(CalibratedPrunePass):
    """See the module docstring."""

    label = "wanda"

    def prune_weight(self, w: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return w.masked_fill(wanda_mask(w, stats.norms, self.options.sparsity, self.nm), 0.0)
