"""What a `target NAME { ... }` kind is, and where the compiler finds the kinds.

Each backend package that builds an artifact has a `target.py` whose `TARGET` object is the
whole of that kind: its option model (torch-free, so `planc check` validates it), the
`--emit` stages it adds, `check` (rules that involve more than its own options), `capture` and
`transform` (its own graph for `--emit fx`, if it compiles one) and `build`.
The compiler discovers them (`backends/*/target.py`); adding a target kind touches one file.

`build` gets a `Job`: the driver's services (load the model, capture it, run the pass
pipeline) and what earlier targets left for later ones (trained weights), so a backend never
imports the driver and the driver never asks which kind a target is.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from planc.compiler import ir
from planc.dsl.source import Diagnostic, Span

#: Called with a short description of the stage being entered (the CLI shows it as progress).
Progress = Callable[[str], None]


@dataclass
class Built:
    """What one target produced."""

    artifact: Path
    report: dict[str, Any] = field(default_factory=dict)
    session: Any = None
    records: list = field(default_factory=list)


@dataclass
class Job:
    """One compile, as a target's `build` sees it."""

    plan: ir.Plan
    #: Where this target writes (the output directory, or `DIR/<kind>` when a plan has several).
    out_dir: Path
    progress: Progress
    #: The driver's stages: `load()` the eager model (a fresh copy each call), `table(loaded)`
    #: its (module path, class) rows, `resolve(loaded)` each step with its module paths,
    #: `capture(loaded)` an fx graph, `run_passes(captured, steps=None)` the pipeline (or only
    #: those of its steps) -> (graph, records); each raises located diagnostics.
    load: Callable[[], Any]
    table: Callable[[Any], list[tuple[str, str]]]
    resolve: Callable[[Any], list]
    capture: Callable[[Any], Any]
    run_passes: Callable[..., tuple[Any, list]]
    #: Left by targets built earlier in the same compile for later ones (e.g. "weights").
    shared: dict[str, Any] = field(default_factory=dict)
    #: Kinds of the other targets this compile builds.
    others: tuple[str, ...] = ()
    #: The eager model as the plan names it, before architecture rewrites (`share`): what a
    #: rewritten model is verified against. None: the same as `load`.
    load_original: Callable[[], Any] | None = None
    #: When this compile began (`time.perf_counter`): a report's `compile_seconds` counts from it,
    #: so the pass pipeline and any precision search are part of the figure.
    started: float = field(default_factory=time.perf_counter)


class TargetKind(Protocol):
    """One `target NAME { }` kind; see the module docstring."""

    kind: ClassVar[str]
    options: ClassVar[type[BaseModel]]
    #: `--emit` stages it adds (building only this target).
    stages: ClassVar[tuple[str, ...]]
    #: Targets build in ascending order (a trainer before the exporter of what it trained).
    order: ClassVar[int]

    def check(self, plan: ir.Plan, target: ir.Target) -> list[Diagnostic]: ...

    def capture(self, target: ir.Target, loaded: Any) -> Any | None:
        """The graph `--emit fx` prints when the target compiles its own graph (a decoder's
        key/value-cache graph); None: the driver's capture of the model."""
        ...

    def transform(self, job: Job, target: ir.Target, loaded: Any, stop_after: str) -> Any | None:
        """The target's own graph after pass `stop_after` (`--emit fx-after:NAME`); None: the
        driver's pipeline on its capture."""
        ...

    def build(self, job: Job, target: ir.Target) -> Built: ...


def missing_file(base: Path, relative: str, span: Span) -> Diagnostic | None:
    """An error at `span` when the plan names a file that is not there."""
    return None if (base / relative).exists() else Diagnostic("error", f"file not found: {relative}", span)


@cache
def target_kinds() -> dict[str, TargetKind]:
    """Every target kind, by name: the `TARGET` of each `backends/<package>/target.py`."""
    import planc.backends as backends

    kinds: dict[str, TargetKind] = {}
    for package in sorted(info.name for info in pkgutil.iter_modules(backends.__path__) if info.ispkg):
        name = f"planc.backends.{package}.target"
        if importlib.util.find_spec(name) is not None:
            kind = importlib.import_module(name).TARGET
            kinds[kind.kind] = kind
    return kinds
