"""The calling convention every graph pass follows.

A pass is a `GraphPass` subclass holding its option model (`passes/options.py`). The manager
calls `requires` (can the graph take the pass?), `call` (rewrite in place, return a
`PassResult`), then `ensures` (does the promised property hold?). Any of them raises
`PassError` with a message a user can act on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import fx

from planc.passes.options import PassOptions

O = TypeVar("O", bound=PassOptions)


class PassError(Exception):
    """A pass cannot run or did not reach its guarantee; the message is for the plan's author.

    `source` is the plan location ("plan.plan:7:3") of the pass line when known.
    """

    def __init__(self, message: str, *, source: str | None = None, pass_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.pass_name = pass_name


@dataclass
class PassContext:
    """What a pass may look at besides the graph."""

    #: The original eager model (reference only; never mutated).
    model: torch.nn.Module
    #: Realistic inputs, keyword -> tensor (real token ids with padding).
    example_inputs: dict[str, torch.Tensor]
    #: Dotted module paths (as in `model.named_modules()`) the plan's selector resolved to.
    targets: frozenset[str]
    #: Plan location of the pass line; recorded in `node.meta["planc_source"]` of touched nodes.
    source: str
    #: text file, count -> model input dicts (calibration); provided by the model source (`compiler.model`).
    load_samples: Callable[[str, int], list[dict[str, torch.Tensor]]] | None = None
    #: The CPU an int8 artifact is compiled for (`passes/cpu.py`): its weight range and arithmetic.
    cpu: str = "auto"
    #: Free-form per-pass extras.
    report: dict = field(default_factory=dict)


@dataclass
class PassResult:
    #: One line for humans, e.g. "pruned 12 Linear to 50.0% sparsity".
    summary: str
    #: Machine-readable details (per-layer sparsity, stage costs, ...).
    details: dict = field(default_factory=dict)
    #: Set when the pass built a new module instead of rewriting in place (partition).
    graph: fx.GraphModule | None = None


class GraphPass(Generic[O]):
    """Base of all passes: `self.options` is the pass's validated option model."""

    def __init__(self, options: O) -> None:
        self.options = options

    @property
    def name(self) -> str:
        return self.options.name

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise PassError if the graph cannot take this pass."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement call()")

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise PassError if the pass's guarantee does not hold on the rewritten graph."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
