"""planc: an optimization-plan compiler for PyTorch language models.

`planc.compile(plan, ...)` is the Python API. This file installs as the top-level `planc` package;
`planc.dsl`, `planc.compiler`, `planc.passes` and `planc.backends` are the repository's four
folders (see `package-dir` in pyproject.toml). Importing `planc` does not import torch; only
compiling (capturing a model, running passes) does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planc.compiler.driver import Result


def compile(plan: str | Path, model: Any = None, out_dir: str | Path | None = None, emit: str | None = None) -> Result:  # noqa: A001 - the API's name
    """Compile the plan file `plan`; `model` (an nn.Module) replaces the plan's model source.

    Returns a `Result` with the artifact path, its report and, for ONNX targets, a ready
    ONNX Runtime session. Raises `dsl.source.PlanError` with diagnostics for a bad plan.
    """
    from planc.compiler.driver import compile_plan

    if out_dir is None and emit is None:
        out_dir = Path(plan).with_suffix("").name + ".out"
    return compile_plan(plan, out_dir, emit=emit, model=model)
