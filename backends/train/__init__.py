"""The training backend: `target train` becomes a standalone torchrun program.

`emit_training_program` writes DIR/train.py (readable, the plan's values as constants),
DIR/launch.sh (the torchrun line), DIR/planc_runtime/ (the package of helpers train.py imports)
and DIR/plan.resolved; `launch` runs it; `check_batch_config` reports static problems of the
target (batch sizes, mesh shapes, unsupported combinations) for the plan's diagnostics.

Only the checks are imported here: `planc check` validates plans through them and must not load
the emitter (`backends.train.emit`) or the launcher (`backends.train.launch`); import those.
"""

from __future__ import annotations

from planc.backends.train.checks import TrainPlanError, check_batch_config

__all__ = ["TrainPlanError", "check_batch_config"]
