"""Session fixtures of the front-end tests: each real model is loaded (and MiniLM captured) once."""

from __future__ import annotations

import pytest

from frontend_sources import gpt_source, minilm_source


@pytest.fixture(scope="session")
def minilm():
    from planc.compiler.model import load_model

    return load_model(minilm_source())


@pytest.fixture(scope="session")
def minilm_graph(minilm):
    from planc.compiler.model import capture

    return capture(minilm)


@pytest.fixture(scope="session")
def gpt():
    from planc.compiler.model import load_model

    return load_model(gpt_source())
