"""`one_torch_thread`, a session fixture the decoder and share suites import into their conftest
(importing it there makes it autouse for that folder only)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Eager references on one thread: on a shared 2-core machine two threads run several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
