"""Fixtures of the share tests: a briefly trained example GPT, the multi-head original every
test pools from, built once per session.

Training for a few seconds makes next-token distributions peaked, as a real model's are: greedy
tokens then do not hinge on float noise, and pooling heads measurably hurts before uptraining.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from share_helpers import GPT_SHAPE, generated_bytes, next_token_loss, windows
from shared_models import example_gpt_module
from torch_threads import one_torch_thread  # noqa: F401  (autouse: one thread in this folder)


@pytest.fixture(scope="session")
def text() -> dict[str, torch.Tensor]:
    return {"train": generated_bytes(600, seed=1), "heldout": generated_bytes(100, seed=5)}


@pytest.fixture(scope="session")
def gpt_checkpoint(tmp_path_factory, text) -> Path:
    """State dict of the example GPT (4 heads) after 100 AdamW steps on generated text."""
    torch.manual_seed(0)
    model = example_gpt_module().gpt(**GPT_SHAPE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss = next_token_loss(model, windows(text["train"], 16, 64, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("share_models") / "gpt_mha.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture()
def trained_gpt(gpt_checkpoint) -> torch.nn.Module:
    """A fresh copy of the trained multi-head GPT (tests rewrite it in place)."""
    return example_gpt_module().gpt(**GPT_SHAPE, checkpoint=str(gpt_checkpoint))
