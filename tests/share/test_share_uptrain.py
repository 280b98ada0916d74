"""Uptraining (Ainslie et al. 2023): after pooling, a few steps of distillation from the original
multi-head model, with the training program's own Distiller, lower the held-out loss."""

from __future__ import annotations

import copy

import torch

from planc.backends.train import planc_runtime as rt
from share_helpers import next_token_loss, windows


def heldout_loss(model: torch.nn.Module, rows: torch.Tensor) -> float:
    with torch.no_grad():
        return float(next_token_loss(model.eval(), rows))


def test_distillation_from_the_original_lowers_the_pooled_models_heldout_loss(trained_gpt, text):
    heldout = windows(text["heldout"], 32, 64, torch.Generator().manual_seed(9))
    teacher = copy.deepcopy(trained_gpt).eval().requires_grad_(False)
    student = trained_gpt
    rt.share_kv_heads(student, 1)  # multi-query: the largest cut, the clearest recovery
    pooled = heldout_loss(student, heldout)
    assert pooled > heldout_loss(teacher, heldout)  # pooling lost something to recover

    distiller = rt.Distiller(teacher, student, temperature=1.0, alpha=0.5, losses=["logits"], layer_map=[])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    student.train()
    for _ in range(40):
        rows = windows(text["train"], 16, 64, generator)
        logits = student(rows[:, :-1])
        loss = distiller.loss(logits, rows[:, :-1], rt.causal_lm_loss(logits, rows[:, 1:]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert heldout_loss(student, heldout) < pooled
