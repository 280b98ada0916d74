"""Lazy registry: pass name -> implementation, imported only when a graph is touched.

Option models (`passes/options.py`) import without torch; `load_pass` imports the pass's
module on demand, so validating a plan never pays for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from passes.options import PASS_OPTIONS, PassOptions

if TYPE_CHECKING:
    from passes.base import GraphPass

#: Pass name (as in `.plan` files) -> "module:Class" of its implementation.
PASS_IMPLEMENTATIONS: dict[str, str] = {
    "prune": "passes.prune:PrunePass",
    "lowrank": "passes.lowrank:LowRankPass",
    "quantize": "passes.quantize:QuantizePass",
    "cast": "passes.cast:CastPass",
    "partition": "passes.partition:PartitionPass",
}


def load_pass(options: PassOptions) -> GraphPass:
    """The GraphPass implementing `options` (an instance of one of the option models)."""
    name = options.name
    if name not in PASS_IMPLEMENTATIONS:
        raise KeyError(f"no implementation registered for pass '{name}'; known: {sorted(PASS_IMPLEMENTATIONS)}")
    module_name, _, class_name = PASS_IMPLEMENTATIONS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(options)


assert set(PASS_IMPLEMENTATIONS) == set(PASS_OPTIONS), "every option model needs an implementation"
