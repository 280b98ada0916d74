"""Render the generated `train.py` and `launch.sh` from their templates.

Each `_block` function returns one piece of code for a placeholder of
`templates/train.py.tmpl`, written for the parallelism and features the plan uses only, so the
program reads like hand-written code instead of a maze of switches.

The blocks live by concern: `program.py` (what a program is made of, Python literals),
`setup_code.py` (constants, build_model), `loop_code.py` (parallelize, the step, evaluation),
`files.py` (the whole `train.py` and `launch.sh`).
"""

from __future__ import annotations

from planc.backends.train.render.files import render_launch_sh, render_train_py
from planc.backends.train.render.program import Program

__all__ = ["Program", "render_launch_sh", "render_train_py"]
