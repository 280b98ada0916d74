"""`quantize { method = awq }`: activation-aware weight quantization (Lin et al. 2023).

The selected Linears are grouped by the input they read. Per group, input channel j gets the
factor `s_j = mean|X_j|^alpha`, normalized by `sqrt(max s * min s)`, with alpha searched on
`GRID` points of [0, 1]: the one minimizing the summed squared output error
`||X W^T - X (Q(W diag s) / s)^T||^2` of the group's Linears on the calibration rows, Q being
the round-to-nearest of the chosen scheme. alpha = 0 is plain round-to-nearest, so the search
never does worse than rtn on the calibration rows. The factors are then applied exactly as
`smooth = alpha` applies its own (`QuantizePass._scale_inputs`: weight columns times s, the
input divided by s, folded into the producing layer_norm when possible), and the scaled weights
are rounded to nearest by the shared rewrite; the result's `smooth` details give each input's
alpha and how its factors were folded. The error is measured on the Linears' own outputs
(not the whole block's), and the weight clipping search of the paper is not done.
"""

from __future__ import annotations

import torch
from torch import fx

from planc.passes.base import PassContext
from planc.passes.calibration import InputStats, sequential
from planc.passes.graph_utils import LinearSite, get_tensor
from planc.passes.quantize.rtn import Chosen, QuantizePass
from planc.passes.quantize.weights import WeightFormat, rtn, rtn_by_rows

#: Points of the alpha grid in [0, 1] (the paper's 20).
GRID = 20
#: Calibration rows (tokens) per input kept to measure the output error.
ROWS = 4096
#: Floor of mean|X_j| (a channel that is always 0 keeps a finite factor).
EPS = 1e-4


def awq_factors(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|X|^alpha, normalized so that max(s) * min(s) = 1 (as the paper's code does)."""
    s = mean_abs.clamp(min=EPS) ** alpha
    return s / (s.max() * s.min()).sqrt()


def relative_errors(x: torch.Tensor, weights: list[torch.Tensor], w_hats: list[torch.Tensor]) -> list[float]:
    """||X W^T - X W_hat^T|| / ||X W^T|| per weight."""
    out = []
    for w, w_hat in zip(weights, w_hats, strict=True):
        ref = x @ w.t()
        out.append(float((x @ w_hat.t() - ref).norm() / ref.norm().clamp(min=1e-12)))
    return out


def search_alpha(
    weights: list[torch.Tensor], mean_abs: torch.Tensor, x: torch.Tensor, fmt: WeightFormat, grid: int = GRID
) -> tuple[float, torch.Tensor, list[float]]:
    """(alpha, factors s, per-weight relative output error) of the best alpha on rows x [rows, in].

    The errors are those of the unscaled layer: W_hat = Q(W diag s) / s against W.
    """
    weights = [w.detach().float() for w in weights]
    refs = [x @ w.t() for w in weights]

    def attempt(alpha: float) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        s = awq_factors(mean_abs, alpha)
        w_hats = [rtn(w * s, fmt).w_hat / s for w in weights]
        loss = float(sum(((x @ w_hat.t() - ref) ** 2).sum() for w_hat, ref in zip(w_hats, refs, strict=True)))
        return loss, s, w_hats

    best_alpha, (best_loss, best_s, best_hats) = 0.0, attempt(0.0)
    for alpha in torch.linspace(0.0, 1.0, grid).tolist()[1:]:
        loss, s, w_hats = attempt(alpha)
        if loss < best_loss:
            best_alpha, best_loss, best_s, best_hats = alpha, loss, s, w_hats
    return best_alpha, best_s, relative_errors(x, weights, best_hats)


class AWQPass(QuantizePass):
    """See the module docstring; the rewrite is rtn's."""

    method = "awq"

    def _prepare(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, dict]:
        """Search each group's alpha when the calibration walk reaches its input (its rows and
        weights in memory, one group at a time), then scale every group (rule 5)."""
        fmt = self.weight_format
        groups = self._smoothable(gm, linears)
        self._errors: dict[str, dict] = {}
        factors: dict[fx.Node, tuple[float, torch.Tensor]] = {}

        def search(sites: list[LinearSite], stats: InputStats) -> None:
            weights = list(dict.fromkeys(site.weight for site in sites))
            tensors = [get_tensor(gm, w).detach().float() for w in weights]
            rows = stats.sample
            alpha, scale, errors = search_alpha(tensors, stats.mean_abs, rows, fmt)
            plain = relative_errors(rows, tensors, [rtn(w, fmt).w_hat for w in tensors])
            for weight, error, rtn_error in zip(weights, errors, plain, strict=True):
                self._errors[weight] = {"alpha": alpha, "output_error": error, "rtn_output_error": rtn_error}
            factors[sites[0].input] = (alpha, scale)

        selected = [site for sites in groups.values() for site in sites]
        seconds = sequential(gm, self._samples(ctx, "awq scales"), selected, search, "awq", keep_rows=ROWS, gram=False)
        done = {x.name: {**self._scale_inputs(gm, x, sites, factors[x][1], ctx.source), "alpha": factors[x][0]}
                for x, sites in groups.items()}
        self.method_details.update(seconds=round(seconds, 3), grid=GRID)
        return done

    def _solve(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, Chosen]:
        """Round the scaled weights to nearest, reporting the errors measured by the search."""
        solved: dict[str, Chosen] = {}
        for site in linears:
            if site.weight in self._errors and site.weight not in solved:
                tensors, max_error = rtn_by_rows(get_tensor(gm, site.weight).detach().float(), self.weight_format)
                solved[site.weight] = (tensors, {**self._errors[site.weight], "max_abs_error": max_error})
        return solved
