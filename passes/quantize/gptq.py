"""`quantize { method = gptq }`: GPTQ (Frantar et al. 2022), stored in the layouts rtn uses.

Per Linear W [out, in] with inputs X from the calibration samples, H = X^T X / n (GPTQ's
2 X^T X up to a factor that cancels) plus `damp * mean(diag H)` on the diagonal. The columns
are rounded one by one (by decreasing diag H with `act_order`); each column's rounding error,
divided by the diagonal of the upper Cholesky factor U of H^-1, is subtracted from the
not-yet-rounded columns through U's row, within blocks of 128 columns and lazily between
blocks. This minimizes ||X W^T - X W_hat^T|| greedily instead of ||W - W_hat||.

Scales: int8 symmetric per row (or per tensor) from the original W, in [-weight_max,
weight_max] of the target CPU. int4 per group of `group_size` columns, computed from the
updated weights when the group's first column is reached (groups never straddle a block); with
`act_order` the columns of a group are no longer rounded together, so the group scales come from
the original W up front ("static groups"), keeping the contiguous groups MatMulNBits stores.
A column whose input is always 0 (diag H = 0) gets diag 1: it is rounded to nearest.

Sequential (`passes/calibration.py`): Linears are solved group by group (those reading one
input together, sharing one H) in graph order; each group's H is measured with the earlier
groups' weights already replaced by their quantized values. The original float weights are
put back before the shared rewrite (`rtn.py`) stores the chosen integers.

`compensate = true` (the asymmetric calibration of GPTAQ, Li et al. 2025): plain GPTQ fits
each layer to its own float output on the inputs X the quantized earlier layers give it, so the
error those layers made flows on. With compensation the target is the float graph's output
instead: the same input, captured on a float copy of the graph as the step received it, gives
X_f, and the weight GPTQ rounds is the ridge least-squares solution
`V = argmin ||X V^T - X_f W^T||^2 + r ||V - W||^2`, with `r = COMPENSATION_RIDGE * mean(diag H)`
pulling V towards W where the few calibration tokens say little. The first group has X = X_f,
so V = W there. Chosen on calibration data only: with the MiniLM sentences split in halves,
fitted on one and scored on the other, the ridge 3 lowered the worst sentence's cosine loss by
about a fifth against plain GPTQ, 1 and 0.1 by less.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from planc.passes.base import PassContext
from planc.passes.calibration import InputStats, capture, damped_inverse_factor, output_error, sequential
from planc.passes.graph_utils import LinearSite, get_tensor, quiet_deepcopy, set_tensor
from planc.passes.quantize.rtn import QuantizePass
from planc.passes.quantize.weights import (
    QuantizedWeight,
    WeightFormat,
    int4_codes,
    int4_params,
    int8_scales,
    pack_int4_codes,
    rtn,
)

#: Columns rounded before the lazy update of the rest (the paper's B).
BLOCK_SIZE = 128
#: compensate: the ridge towards the original weight, as a multiple of mean(diag H).
COMPENSATION_RIDGE = 3.0
#: compensate: calibration rows (tokens) per input captured on both graphs for X^T X_f.
COMPENSATION_ROWS = 1 << 16


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: WeightFormat,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = BLOCK_SIZE,
) -> QuantizedWeight:
    """GPTQ-quantize w [out, in] given H [in, in]; returns the tensors rtn would store, and W_hat."""
    w = w.detach().float().clone()
    n_out, k = w.shape
    int4 = fmt.scheme == "int4"
    g = fmt.group_size
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order else torch.arange(k)
    if int4:
        n_groups = math.ceil(k / g)
        scales, zeros = torch.ones(n_out, n_groups), torch.zeros(n_out, n_groups)
        if act_order:
            for b in range(n_groups):
                scales[:, b], zeros[:, b] = int4_params(w[:, b * g : (b + 1) * g], fmt.symmetric)
        block_size = max(block_size, g)  # a group starts and ends inside one block
    else:
        row_scale = int8_scales(w, fmt)
    w = w[:, order]
    u = damped_inverse_factor(hessian[order][:, order], damp)
    codes = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        errors = torch.zeros_like(w1)
        for i in range(i2 - i1):
            column, col = w1[:, i], int(order[i1 + i])
            if int4:
                b = col // g
                if not act_order and col % g == 0:
                    scales[:, b], zeros[:, b] = int4_params(w1[:, i : i + g], fmt.symmetric)
                code = int4_codes(column, scales[:, b], zeros[:, b], fmt.symmetric)
                value = (code - zeros[:, b]) * scales[:, b]
            else:
                code = torch.clamp(torch.round(column / row_scale), -fmt.weight_max, fmt.weight_max)
                value = code * row_scale
            codes[:, i1 + i] = code
            errors[:, i] = (column - value) / u1[i, i]
            w1[:, i:] -= errors[:, i : i + 1] * u1[i : i + 1, i:]
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    codes = codes[:, torch.argsort(order)]
    if int4:
        return pack_int4_codes(codes, scales, zeros, fmt)
    q = codes.to(torch.int8)
    scale = row_scale[:1].clone() if fmt.granularity == "per_tensor" else row_scale
    return QuantizedWeight({"qweight": q, "w_scale": scale}, q.float() * row_scale[:, None])


def compensated(w: torch.Tensor, x: torch.Tensor, x_float: torch.Tensor, ridge: float = COMPENSATION_RIDGE) -> torch.Tensor:
    """argmin_V ||x V^T - x_float w^T||^2 + r ||V - w||^2 with r = ridge * mean(diag x^T x)
    (rows of x and x_float are the same tokens): the weight that maps the inputs the quantized
    graph gives to the float graph's outputs, kept near w."""
    x, x_float, w = x.double(), x_float.double(), w.detach().double()
    gram = x.t() @ x / x.shape[0]
    cross = x.t() @ x_float / x.shape[0]
    r = ridge * float(torch.diag(gram).mean().clamp(min=1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + r * eye, cross @ w.t() + r * w.t()).t().float()


class GPTQPass(QuantizePass):
    """See the module docstring; the rewrite is rtn's."""

    method = "gptq"

    def _solve(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, tuple[QuantizedWeight, dict]]:
        opts, fmt = self.options, self.weight_format
        originals = {site.weight: get_tensor(gm, site.weight).detach() for site in linears}
        solved: dict[str, tuple[QuantizedWeight, dict]] = {}
        samples = self._samples(ctx, "gptq Hessians")
        # compensate: the float graph as this step received it, to capture X_f on.
        reference = quiet_deepcopy(gm) if opts.compensate else None
        reference_nodes = {node.name: node for node in reference.graph.nodes} if reference is not None else {}

        def solve(sites: list[LinearSite], stats: InputStats) -> None:
            hessian = stats.hessian
            x_float = None
            if reference is not None:
                node = reference_nodes[sites[0].input.name]
                x_float = capture(reference, samples, [node], keep_rows=COMPENSATION_ROWS)[node].sample
            for weight in dict.fromkeys(site.weight for site in sites):
                if weight in solved:  # read by an earlier input too: solved on that one's H
                    continue
                w = originals[weight].float()
                target = compensated(w, stats.sample, x_float) if x_float is not None else w
                chosen = gptq(target, hessian, fmt, opts.damp, opts.act_order)
                errors = {
                    "output_error": output_error(w, chosen.w_hat, hessian),
                    "rtn_output_error": output_error(w, rtn(w, fmt).w_hat, hessian),
                }
                solved[weight] = (chosen, errors)
                set_tensor(gm, weight, chosen.w_hat.to(originals[weight].dtype))

        keep = COMPENSATION_ROWS if reference is not None else 0
        seconds = sequential(gm, samples, linears, solve, "gptq", keep_rows=keep)
        for weight, tensor in originals.items():
            set_tensor(gm, weight, tensor)
        self.method_details.update(seconds=round(seconds, 3), damp=opts.damp, act_order=opts.act_order, block_size=BLOCK_SIZE,
                                   compensate=opts.compensate)
        if opts.compensate:
            self.method_details["compensation_ridge"] = COMPENSATION_RIDGE
        return solved
