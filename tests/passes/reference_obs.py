"""Independent references for planc's SparseGPT and GPTQ, written from the papers' algorithms.

Deliberately plain and shares no code with `passes/`: float64 throughout, the inverse Hessian
by `torch.linalg.inv`, and each column's error applied at once to every column on its right
(the papers' Algorithm 1 without the lazy block batching, which changes nothing but speed).

- SparseGPT (Frantar & Alistarh 2023, Algorithm 1): at the start of each block of B columns the
  mask keeps the (1 - p) share of the block's entries with the largest w^2 / [H^-1]_cc^2,
  compared over the whole block (all rows); for n:m, each row's m - n smallest of every m.
- GPTQ (Frantar et al. 2022, Algorithm 1): columns quantized one by one, each error divided by
  [H^-1]_jj and spread over the later columns; int4 group parameters taken from the updated
  weights when a group starts (from the original ones up front with act-order: static groups).

`layer_problem` builds the layers both are compared on: correlated inputs with a few outlier
channels, and output rows of very different norms.
"""

from __future__ import annotations

import torch


def layer_problem(seed: int, out: int = 96, k: int = 256, rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [out, k], x [rows, k]): low-rank correlated inputs plus noise, 4 input channels 20x
    larger than the rest, and row norms spread over about one order of magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.3 * torch.randn(rows, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 20.0
    w = torch.randn(out, k, generator=g) * torch.exp(0.5 * torch.randn(out, 1, generator=g))
    return w, x


def squared_output_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    """||X W^T - X W_new^T||^2 on the rows themselves."""
    return float(((x.double() @ (w.double() - w_new.double()).t()) ** 2).sum())


def inverse_hessian_factor(x: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U upper triangular with U^T U = (X^T X / n + damp * mean diag * I)^-1 (dead inputs: diag 1)."""
    x = x.double()
    h = x.t() @ x / x.shape[0]
    for j in range(h.shape[0]):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.linalg.inv(h)).t()


def sparsegpt_reference(
    w: torch.Tensor, x: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, block: int = 128
) -> torch.Tensor:
    """SparseGPT's pruned and updated weight, the mask chosen over each whole block of columns."""
    w = w.double().clone()
    out, k = w.shape
    u = inverse_hessian_factor(x)
    mask = torch.zeros(out, k, dtype=torch.bool)
    for start in range(0, k, block):
        end = min(start + block, k)
        if nm is None:
            score = (w[:, start:end] ** 2 / torch.diag(u)[start:end] ** 2).flatten()
            pruned = torch.sort(score).indices[: round(sparsity * score.numel())]
            mask[:, start:end] = torch.zeros_like(score, dtype=torch.bool).index_fill(0, pruned, True).reshape(out, end - start)
        for j in range(start, end):
            if nm is not None and (j - start) % nm[1] == 0:
                n, m = nm
                score = w[:, j : j + m] ** 2 / torch.diag(u)[j : j + m] ** 2
                smallest = torch.topk(score, m - n, dim=1, largest=False).indices
                mask[:, j : j + m] = torch.zeros_like(score, dtype=torch.bool).scatter(1, smallest, True)
            error = torch.where(mask[:, j], w[:, j], 0.0) / u[j, j]
            w[:, j:] -= torch.outer(error, u[j, j:])
    return w.masked_fill(mask, 0.0)


def int4_group_params(columns: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero) per row of a group: symmetric codes -8..7 of step max|w| / 7; asymmetric
    codes 0..15 spanning [min(w, 0), max(w, 0)]."""
    if symmetric:
        amax = columns.abs().amax(dim=1)
        return torch.where(amax > 0, amax / 7, torch.ones_like(amax)), torch.zeros_like(amax)
    lo, hi = columns.amin(dim=1).clamp(max=0), columns.amax(dim=1).clamp(min=0)
    step = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    return step, torch.round(-lo / step)


def round_int4(column: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> torch.Tensor:
    if symmetric:
        return torch.clamp(torch.round(column / step), -8, 7) * step
    return (torch.clamp(torch.round(column / step) + zero, 0, 15) - zero) * step


def gptq_reference(
    w: torch.Tensor, x: torch.Tensor, bits: int, group: int = 32, symmetric: bool = True, act_order: bool = False, levels: int = 127
) -> torch.Tensor:
    """GPTQ's dequantized weight: int8 per row (`levels` steps each side) or int4 per `group` columns."""
    w = w.double().clone()
    k = w.shape[1]
    order = torch.argsort(torch.diag(x.double().t() @ x.double()), descending=True) if act_order else torch.arange(k)
    static = {}
    if bits == 4 and act_order:
        static = {g: int4_group_params(w[:, g : g + group], symmetric) for g in range(0, k, group)}
    row_step = w.abs().amax(dim=1) / levels  # int8: symmetric per row, from the original w
    row_step = torch.where(row_step > 0, row_step, torch.ones_like(row_step))
    w, x = w[:, order], x[:, order]
    u = inverse_hessian_factor(x)
    params = None
    for j in range(k):
        original = int(order[j])
        if bits == 8:
            q = torch.clamp(torch.round(w[:, j] / row_step), -levels, levels) * row_step
        else:
            if act_order:
                params = static[original // group * group]
            elif original % group == 0:
                params = int4_group_params(w[:, j : j + group], symmetric)
            q = round_int4(w[:, j], *params, symmetric)
        error = (w[:, j] - q) / u[j, j]
        w[:, j:] -= torch.outer(error, u[j, j:])
        w[:, j] = q
    return w[:, torch.argsort(order)]
