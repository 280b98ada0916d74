"""The training backend: `target train` becomes a standalone torchrun program.

`emit_training_program` writes DIR/train.py (readable, the plan's values as constants),
DIR/launch.sh (the torchrun line), DIR/planc_runtime.py (the helpers train.py imports, with
DIR/everyday_text.py) and
DIR/plan.resolved; `launch` runs it; `check_batch_config` reports static problems of the
target (batch sizes, mesh shapes, unsupported combinations) for the plan's diagnostics.
"""

from __future__ import annotations

from backends.train.checks import TrainPlanError, check_batch_config
from backends.train.emit import emit_training_program
from backends.train.launch import launch

__all__ = ["TrainPlanError", "check_batch_config", "emit_training_program", "launch"]
