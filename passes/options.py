"""The base of every pass's option model, and the registry that finds them, without torch.

A pass is a package `passes/<name>/`: its `__init__.py` declares the option model (a frozen
pydantic model whose `name` is spelled exactly as in `.plan` files, whose `impl` names the
GraphPass that receives it), and its other modules implement it. Nothing else lists passes:
`pass_options()` imports each package's `__init__` (never the implementation), so `planc check`
validates a plan without loading torch. Unknown or ill-typed options are rejected by the model
itself, and the compiler maps the error back to the option's span in the plan.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

_REGISTERED: dict[str, type[PassOptions]] = {}


class PassOptions(BaseModel):
    """Base of all pass option models: frozen, no unknown fields; subclasses register themselves."""

    # defer_build: a plan validates only the passes it uses; `planc check` skips building the rest.
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    name: ClassVar[str]
    #: "module:Class" of the GraphPass implementing these options, imported only when a graph
    #: is touched. A pass with one class per method overrides `implementation()` instead.
    impl: ClassVar[str]
    #: Module types the pass acts on when the plan gives no selector.
    default_types: ClassVar[tuple[str, ...]] = ("Linear",)
    #: True for a pass that changes the model's architecture (share): its implementation has
    #: `apply(model) -> (summary, details)` and rewrites the eager model before capture, on the
    #: whole model (no selector), ahead of every graph pass.
    rewrites_model: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTERED[cls.name] = cls

    def implementation(self) -> str:
        """The "module:Class" for these option values (a pass with several methods picks one)."""
        return self.impl


@cache
def pass_options() -> dict[str, type[PassOptions]]:
    """Every pass, by the name plans use: the option model of each package under `passes/`."""
    package = importlib.import_module(__name__.rpartition(".")[0])
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(sorted(_REGISTERED.items()))
