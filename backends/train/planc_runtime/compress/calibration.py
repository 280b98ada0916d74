"""Activation statistics for structured pruning: what each input of a Linear contributes on
real training text, and least-squares refits of a Linear that lost some of its inputs.

calibration_batches    the text measured (the same on every rank); example_batch, a few samples to trace
input_gram             the Gram matrix of a Linear's inputs over those batches
output_energy          per head / channel, the energy it adds to the output (importance = activation)
refit_weight           weights on fewer inputs reproducing the original's output (reconstruct);
                       refit_columns, the same as a new nn.Linear
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data import SentenceSet


@torch.no_grad()
def input_gram(model: nn.Module, linear: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """G = sum over real tokens of [x, 1]^T [x, 1], x the input of `linear` (an nn.Linear or any
    projection module, e.g. GPT-2's Conv1D) as `model` runs on `batches` (eval mode, no dropout):
    float64, [in + 1, in + 1], last row/column the constant.

    It is all a least-squares refit of `linear`'s input columns needs (refit_weight), and its
    diagonal with the weights gives each input's output energy (output_energy).
    """
    if not batches:
        raise ValueError("importance = activation and reconstruct need calibration batches of training text")
    device = next(linear.parameters()).device
    grams: list[torch.Tensor] = []
    real: list[torch.Tensor] = []

    def accumulate(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        x = x[real[0]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
        x = torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], 1)
        if not grams:  # sized by the first input: the module's input width
            grams.append(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device))
        grams[0].add_(x.t() @ x)

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
    if not grams:
        raise ValueError(f"{type(linear).__name__} did not run on the calibration batches")
    return grams[0]


def output_energy(weight: torch.Tensor, gram: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per group of input columns (rows of `groups`: a head's, or one channel), the summed
    squared norm of what those inputs add to the output, sum_tokens |W[:, g] x_g|^2."""
    w = weight.detach().double().t()  # [in, out]
    return torch.stack([((gram[g][:, g] @ w[g]) * w[g]).sum() for g in groups]).float()


@torch.no_grad()
def refit_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, kept], bias) reading only input columns `keep` of `weight` [out, in], refit
    by (ridge) least squares so that on the tokens behind `gram` they reproduce the original
    output: the kept columns and the bias absorb what the removed ones contributed (e.g. their
    mean). In the original's device and dtype."""
    device, dtype = weight.device, weight.dtype
    constant = gram.shape[0] - 1
    full = weight.double()
    if bias is not None:
        full = torch.cat([full, bias.double()[:, None]], 1)  # [out, in + 1]
    index = keep.to(device)
    if bias is not None:
        index = torch.cat([index, torch.tensor([constant], device=device)])
    kept = gram[index][:, index]
    damping = ridge * kept.diagonal().mean() * torch.eye(len(index), dtype=torch.float64, device=device)
    solution = torch.linalg.solve(kept + damping, gram[index][:, : full.shape[1]] @ full.t())  # [kept (+1), out]
    new_bias = solution[-1].to(dtype) if bias is not None else None
    return solution[: len(keep)].t().to(dtype).contiguous(), new_bias


@torch.no_grad()
def refit_columns(linear: nn.Linear, gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-3) -> nn.Linear:
    """A Linear reading only input columns `keep`, refit as refit_weight says."""
    weight, bias = refit_weight(linear.weight, linear.bias, gram, keep, ridge)
    new = nn.Linear(len(keep), linear.out_features, bias=bias is not None).to(device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def calibration_batches(samples: SentenceSet | torch.Tensor, count: int = 1024,
                        micro_batch: int = 32) -> list[dict[str, torch.Tensor]]:
    """The first `count` training sentences (or packed token rows), the same on every rank, in
    batches: the text that importance = activation and reconstruct measure."""
    if isinstance(samples, torch.Tensor):
        # Rows hold many sentences' worth of tokens; the model reads all but the last (a target).
        rows = samples[: max(1, count // 8), :-1]
        return [{"input_ids": rows[i : i + micro_batch]} for i in range(0, len(rows), micro_batch)]
    chosen = sorted(range(min(count, len(samples))), key=lambda i: len(samples.ids[i]))
    return [samples.collate(chosen[i : i + micro_batch]) for i in range(0, len(chosen), micro_batch)]


def example_batch(samples: SentenceSet | torch.Tensor, count: int = 4) -> dict[str, torch.Tensor]:
    """A few training samples as the model's inputs, the same on every rank: what structured
    pruning traces the model on to find its heads and channels. Sentences are padded, as in
    training; packed token rows have no padding."""
    if isinstance(samples, torch.Tensor):
        return {"input_ids": samples[:count, :-1]}  # as training feeds them: seq_len ids, the last is a target
    batch = samples.collate(range(min(count, len(samples))))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
