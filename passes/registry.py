"""Lazy registry: pass options -> implementation, imported only when a graph is touched.

Each pass package's option model (`passes/<name>/__init__.py`) names its implementation (`impl`,
or `implementation()` for a pass with one class per method); nothing else lists passes. Option
models import without torch, so validating a plan never pays for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from planc.passes.options import PassOptions

if TYPE_CHECKING:
    from planc.passes.base import GraphPass


def load_pass(options: PassOptions) -> GraphPass:
    """The GraphPass implementing `options` (an instance of one of the option models)."""
    module_name, _, class_name = options.implementation().partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(options)
