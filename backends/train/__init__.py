"""The training backend: `target train` becomes a standalone torchrun program.

`emit_training_program` writes DIR/train.py (readable, the plan's values as constants),
DIR/launch.sh (the torchrun line), DIR/planc_runtime.py (the helpers train.py imports) and
DIR/plan.resolved; `launch` runs it; `check_batch_config` reports static problems of the
target (batch sizes, mesh shapes, unsupported combinations) for the plan's diagnostics.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public names and the module that defines each; loaded on first use, so that `planc check`
#: (which needs only `checks`) does not pay for the emitter.
_EXPORTS = {
    "TrainPlanError": "backends.train.checks",
    "check_batch_config": "backends.train.checks",
    "emit_training_program": "backends.train.emit",
    "launch": "backends.train.launch",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'backends.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
