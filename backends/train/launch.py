"""Run an emitted training program: `planc train PLAN` ends here."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def torchrun_command() -> str:
    """The torchrun of the running Python (its venv's script, or `python -m torch.distributed.run`)."""
    script = Path(sys.executable).parent / "torchrun"
    return str(script) if script.is_file() else f"{sys.executable} -m torch.distributed.run"


def launch(out_dir: Path, env_overrides: dict[str, str] | None = None, timeout: float | None = None,
           log_file: Path | None = None) -> int:
    """Run `out_dir/launch.sh` and return its exit code.

    `env_overrides` set launch.sh's variables (NPROC_PER_NODE, NNODES, RDZV_ENDPOINT,
    MAX_RESTARTS, TORCHRUN) or anything train.py reads; TORCHRUN defaults to this Python's
    torchrun. After `timeout` seconds the whole job (torchrun and its workers) is killed and
    TimeoutError raised. `log_file` takes the job's output instead of the console (sweep
    trials running side by side).
    """
    script = Path(out_dir).resolve() / "launch.sh"
    if not script.is_file():
        raise FileNotFoundError(f"{script} does not exist: emit the training program first")
    env = dict(os.environ)
    env.setdefault("TORCHRUN", torchrun_command())
    env.update({k: str(v) for k, v in (env_overrides or {}).items()})
    log.info("launching %s", script)
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(open(log_file, "w")) if log_file is not None else None
        job = subprocess.Popen(["bash", str(script)], env=env, cwd=script.parent, start_new_session=True,
                               stdout=output, stderr=subprocess.STDOUT if output else None)
        try:
            return job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)  # its own session: torchrun and every worker
            job.wait()
            raise TimeoutError(f"training job {script} ran past {timeout} s and was killed") from None
