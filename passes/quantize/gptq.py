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
groups' weights already replaced by their quantized values: the calibration walk reads a solved
group's rounded weights in place of its float ones until their last reader has run, so the
graph's weights never change and the shared rewrite (`rtn.py`) stores the chosen integers. Rows
are rounded in blocks (`gptq_by_rows`; each row's error feedback is its own), so a real-sized
decoder's weights, read from its checkpoint one at a time, stream through GPTQ.

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
from planc.passes.calibration import InputStats, capture, damped_inverse_factor, output_error, output_error_terms, sequential
from planc.passes.graph_utils import LinearSite, get_tensor, quiet_deepcopy, stored_tensor
from planc.passes.quantize.rtn import QuantizePass
from planc.passes.quantize.weights import (
    RTN_BLOCK_ROWS,
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
    order, u = gptq_factor(hessian, damp, act_order)
    return _gptq_rows(w, order, u, fmt, act_order, block_size)


def gptq_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(column order, upper factor of the damped H^-1 in that order): what GPTQ needs from H,
    computed once for all the Linears that read one input (a real-sized down projection's
    8192 x 8192 factorization takes seconds)."""
    order = _column_order(hessian, act_order)
    return order, damped_inverse_factor(hessian[order][:, order] if act_order else hessian, damp)


def gptq_by_rows(
    w: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, factor: tuple[torch.Tensor, torch.Tensor], act_order: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """`gptq` block by block over rows (each row is rounded on its own: H is shared, the error
    feedback runs along a row), so a real-sized LM head needs no full-size temporaries but the
    result; `factor` is `gptq_factor`'s. Returns the integer tensors, the errors the report
    gives (max |w - w_hat|, the relative output error on H, and round-to-nearest's), and W_hat."""
    order, u = factor
    rows = RTN_BLOCK_ROWS if fmt.scheme == "int4" or fmt.granularity == "per_channel" else w.shape[0]
    parts: list[dict[str, torch.Tensor]] = []
    w_hat = torch.empty(w.shape, dtype=torch.float32)
    max_error, ours, plain, reference = 0.0, 0.0, 0.0, 0.0
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows].detach().float()
        chosen = _gptq_rows(block, order, u, fmt, act_order, BLOCK_SIZE)
        parts.append(chosen.tensors)
        w_hat[start : start + rows] = chosen.w_hat
        max_error = max(max_error, float((block - chosen.w_hat).abs().max()))
        (error, plain_error), norm = output_error_terms(block, [chosen.w_hat, rtn(block, fmt).w_hat], hessian)
        ours, plain, reference = ours + error, plain + plain_error, reference + norm
    tensors = parts[0] if len(parts) == 1 else {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    relative = (lambda error: math.sqrt(error / reference) if reference > 0 else 0.0)  # noqa: E731
    return tensors, {"max_abs_error": max_error, "output_error": relative(ours), "rtn_output_error": relative(plain)}, w_hat


def _column_order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The order columns are rounded in: by decreasing diag H with `act_order`."""
    k = hessian.shape[0]
    return torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order else torch.arange(k)


def _gptq_rows(
    w: torch.Tensor, order: torch.Tensor, u: torch.Tensor, fmt: WeightFormat, act_order: bool, block_size: int
) -> QuantizedWeight:
    """GPTQ of rows w [out, in] with the columns in `order` and the upper factor `u` of
    (H + damp)^-1 (permuted by `order`).

    Worked on W transposed: the column being rounded and the columns its error is spread over
    are then contiguous rows, and each update is one outer product (`addr_`) instead of a
    strided update of every row (several times faster on a CPU)."""
    n_out, k = w.shape
    int4 = fmt.scheme == "int4"
    g = fmt.group_size
    if int4:
        n_groups = math.ceil(k / g)
        scales, zeros = torch.ones(n_out, n_groups), torch.zeros(n_out, n_groups)
        if act_order:
            for b in range(n_groups):
                scales[:, b], zeros[:, b] = int4_params(w[:, b * g : (b + 1) * g].float(), fmt.symmetric)
        block_size = max(block_size, g)  # a group starts and ends inside one block
    else:
        row_scale = int8_scales(w.float(), fmt)
    wt = w.detach().float()[:, order].t().contiguous()  # row j: column order[j] of W
    codes = torch.empty_like(wt)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]  # w1 is a view: updated in place
        errors = torch.empty_like(w1)
        for i in range(i2 - i1):
            column, col = w1[i], int(order[i1 + i])
            if int4:
                b = col // g
                if not act_order and col % g == 0:
                    scales[:, b], zeros[:, b] = int4_params(w1[i : i + g].t(), fmt.symmetric)
                code = int4_codes(column, scales[:, b], zeros[:, b], fmt.symmetric)
                value = (code - zeros[:, b]) * scales[:, b]
            else:
                code = torch.clamp(torch.round(column / row_scale), -fmt.weight_max, fmt.weight_max)
                value = code * row_scale
            codes[i1 + i] = code
            torch.div(column - value, u1[i, i], out=errors[i])
            w1[i + 1 :].addr_(u1[i, i + 1 :], errors[i], alpha=-1)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), errors, alpha=-1)
    codes = codes.t()[:, torch.argsort(order)]
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

    def _solve(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        opts, fmt = self.options, self.weight_format
        solved: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
        samples = self._samples(ctx, "gptq Hessians")
        # compensate: the float graph as this step received it, to capture X_f on.
        reference = quiet_deepcopy(gm) if opts.compensate else None
        reference_nodes = {node.name: node for node in reference.graph.nodes} if reference is not None else {}

        def solve(sites: list[LinearSite], stats: InputStats) -> dict[str, torch.Tensor]:
            """Round the group's weights on its H; the rest of the walk reads the rounded ones."""
            hessian = stats.hessian
            x_float = None
            if reference is not None:
                node = reference_nodes[sites[0].input.name]
                x_float = capture(reference, samples, [node], keep_rows=COMPENSATION_ROWS)[node].sample
            rounded: dict[str, torch.Tensor] = {}
            factor = gptq_factor(hessian, opts.damp, opts.act_order)
            for weight in dict.fromkeys(site.weight for site in sites):
                if weight in solved:  # read by an earlier input too: solved on that one's H
                    continue
                w = get_tensor(gm, weight).detach().float()
                target = compensated(w, stats.sample, x_float) if x_float is not None else w
                tensors, errors, w_hat = gptq_by_rows(target, hessian, fmt, factor, opts.act_order)
                if target is not w:  # the errors are against the original weight
                    errors.update(max_abs_error=float((w - w_hat).abs().max()), output_error=output_error(w, w_hat, hessian),
                                  rtn_output_error=output_error(w, rtn(w, fmt).w_hat, hessian))
                solved[weight] = (tensors, errors)
                rounded[weight] = w_hat.to(stored_tensor(gm, weight).dtype)
            return rounded

        keep = COMPENSATION_ROWS if reference is not None else 0
        seconds = sequential(gm, samples, linears, solve, "gptq", keep_rows=keep)
        self.method_details.update(seconds=round(seconds, 3), damp=opts.damp, act_order=opts.act_order, block_size=BLOCK_SIZE,
                                   compensate=opts.compensate)
        if opts.compensate:
            self.method_details["compensation_ridge"] = COMPENSATION_RIDGE
        return solved
