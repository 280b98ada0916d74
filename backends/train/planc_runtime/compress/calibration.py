"""Activation statistics for structured pruning: what each input of a Linear contributes on
real training text, and least-squares refits of a Linear that lost some of its inputs.

calibration_batches    the text measured (the same on every rank)
input_gram             the Gram matrix of a Linear's inputs over those batches
output_energy          per head / channel, the energy it adds to the output (importance = activation)
refit_columns          a Linear on fewer inputs reproducing the original's output (reconstruct)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data import SentenceSet


@torch.no_grad()
def input_gram(model: nn.Module, linear: nn.Linear, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """G = sum over real tokens of [x, 1]^T [x, 1], x the input of `linear` as `model` runs on
    `batches` (eval mode, no dropout): float64, [in + 1, in + 1], last row/column the constant.

    It is all a least-squares refit of `linear`'s input columns needs (refit_columns), and its
    diagonal with the weights gives each input's output energy (output_energy).
    """
    if not batches:
        raise ValueError("importance = activation and reconstruct need calibration batches of training text")
    device = linear.weight.device
    gram = torch.zeros(linear.in_features + 1, linear.in_features + 1, dtype=torch.float64, device=device)
    real: list[torch.Tensor] = []

    def accumulate(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        x = x[real[0]] if x.dim() == 3 else x
        x = torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], 1)
        gram.add_(x.t() @ x)

    handle = linear.register_forward_pre_hook(accumulate)
    training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            if "attention_mask" in batch:  # sentences: skip the padding
                mask = batch["attention_mask"].to(device)
                real[:] = [mask.bool()]
                model(input_ids=ids, attention_mask=mask)
            else:  # packed token rows: every token is real
                real[:] = [torch.ones_like(ids, dtype=torch.bool)]
                model(ids)
    finally:
        handle.remove()
        model.train(training)
    return gram


def output_energy(weight: torch.Tensor, gram: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per group of input columns (rows of `groups`: a head's, or one channel), the summed
    squared norm of what those inputs add to the output, sum_tokens |W[:, g] x_g|^2."""
    w = weight.detach().double().t()  # [in, out]
    return torch.stack([((gram[g][:, g] @ w[g]) * w[g]).sum() for g in groups]).float()


@torch.no_grad()
def refit_columns(linear: nn.Linear, gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-3) -> nn.Linear:
    """A Linear reading only input columns `keep`, refit by (ridge) least squares so that on the
    tokens behind `gram` it reproduces the original's output: the kept columns and the bias
    absorb what the removed ones contributed (e.g. their mean)."""
    device, dtype, bias = linear.weight.device, linear.weight.dtype, linear.bias is not None
    constant = gram.shape[0] - 1
    full = linear.weight.double()
    if bias:
        full = torch.cat([full, linear.bias.double()[:, None]], 1)  # [out, in + 1]
    index = keep.to(device)
    if bias:
        index = torch.cat([index, torch.tensor([constant], device=device)])
    kept = gram[index][:, index]
    damping = ridge * kept.diagonal().mean() * torch.eye(len(index), dtype=torch.float64, device=device)
    solution = torch.linalg.solve(kept + damping, gram[index][:, : full.shape[1]] @ full.t())  # [kept (+1), out]
    new = nn.Linear(len(keep), linear.out_features, bias=bias).to(device=device, dtype=dtype)
    new.weight.copy_(solution[: len(keep)].t())
    if bias:
        new.bias.copy_(solution[-1])
    return new


def calibration_batches(samples: SentenceSet | torch.Tensor, count: int = 1024,
                        micro_batch: int = 32) -> list[dict[str, torch.Tensor]]:
    """The first `count` training sentences (or packed token rows), the same on every rank, in
    batches: the text that importance = activation and reconstruct measure."""
    if isinstance(samples, torch.Tensor):
        rows = samples[: max(1, count // 8)]  # rows hold many sentences' worth of tokens
        return [{"input_ids": rows[i : i + micro_batch]} for i in range(0, len(rows), micro_batch)]
    chosen = sorted(range(min(count, len(samples))), key=lambda i: len(samples.ids[i]))
    return [samples.collate(chosen[i : i + micro_batch]) for i in range(0, len(chosen), micro_batch)]
