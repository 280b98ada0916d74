"""The prune pass, one class per method (the registry picks it from `Prune.implementation()`):

- `magnitude`: unstructured zeros by |w| (`passes/prune/magnitude.py`);
- `nm`: N:M semi-structured zeros (`nm.py`);
- `heads` / `channels`: whole attention heads / MLP channels removed, groups found from the
  graph's data flow (`heads.py`, `channels.py`, `structured.py`, `passes/structure.py`);
- `layers`: whole repeated blocks removed (`layers.py`);
- `wanda` / `sparsegpt`: unstructured or N:M zeros chosen on calibrated layer inputs, block by
  block (`wanda.py`, `sparsegpt.py`, shared `calibrated.py`).

`PrunePass` dispatches on `options.method`, for callers that name the pass rather than the method.
"""

from __future__ import annotations

import importlib

from torch import fx

from planc.passes.base import GraphPass, PassContext, PassResult
from planc.passes.options import Prune


class PrunePass(GraphPass[Prune]):
    """Delegates to the class of `options.method`."""

    def __init__(self, options: Prune) -> None:
        super().__init__(options)
        module_name, _, class_name = options.implementation().partition(":")
        self.method_pass: GraphPass[Prune] = getattr(importlib.import_module(module_name), class_name)(options)

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.method_pass.requires(gm, ctx)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.method_pass.call(gm, ctx)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.method_pass.ensures(gm, ctx)
