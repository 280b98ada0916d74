"""`target train { sweep { lr = [1e-3, 3e-4], warmup = [10, 50] } }`: short trials, the best kept.

Every combination of the listed values is one trial: the same standalone program the plan emits,
with the values substituted (and `trial_steps` steps), emitted into `DIR/sweep/trial-NN/` and run
with torchrun, one after the other or `parallel` at once. The trial with the lowest held-out loss
(the program's final evaluation, on text it never trained on) wins; its values become the
target's, so the program planc then emits, its `plan.resolved` and the trained-weights cache key
are those of a plan that had spelled them out. `DIR/sweep/` keeps the trials, `sweep.json`,
`sweep.txt` (the table) and `sweep.png` (when matplotlib is importable).

A trial whose program is unchanged since an earlier sweep and finished is reused, not rerun.
(`planc check` checks the values without this module: checks.sweep_problems, TrainTarget.trial.)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planc.backends.train.options import TrainTarget
from planc.compiler import ir
from planc.compiler.publish import write_bytes, write_text
from planc.dsl.source import Diagnostic, PlanError

#: Sweep keys whose values usually span decades: plotted on a log axis.
_LOG_KEYS = ("lr", "l1", "weight_decay")


@dataclass
class Trial:
    number: int
    values: dict[str, Any]
    directory: Path
    eval_loss: float | None = None
    seconds: float = 0.0
    status: str = "pending"  # ok | reused | failed: <why>
    first_eval_loss: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "reused") and self.eval_loss is not None and math.isfinite(self.eval_loss)

    def label(self) -> str:
        return ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in self.values.items())


#: Emits the program of a trial target into a directory (the train target's own emit).
EmitTrial = Callable[[TrainTarget, Path], Path]


def run_sweep(target: ir.Target, out_dir: Path, emit: EmitTrial, progress: Callable[[str], None],
              launch: Callable[..., int] | None = None) -> tuple[TrainTarget, dict[str, Any]]:
    """Run every trial of the target's sweep under `out_dir/sweep`; returns the target with the
    best trial's values (and no sweep) and the sweep's report (trials, chosen, table)."""
    if launch is None:
        from planc.backends.train.launch import launch
    options: TrainTarget = target.options  # type: ignore[assignment]
    sweep = options.sweep
    assert sweep is not None
    folder = out_dir / "sweep"
    trials = [Trial(n, values, folder / f"trial-{n:02d}") for n, values in enumerate(sweep.combinations(), 1)]
    for trial in trials:  # emitting is quick and pure Python: all first, then run
        emit(options.trial(trial.values, sweep.trial_steps), trial.directory)
    env = _thread_env(options.world_size * min(sweep.parallel, len(trials)))

    def run(trial: Trial) -> Trial:
        if _finished(trial.directory):
            trial.status = "reused"
        else:
            progress(f"sweep: trial {trial.number}/{len(trials)} ({trial.label()})")
            start = time.perf_counter()
            code = launch(trial.directory, env_overrides=env, log_file=trial.directory / "train.log")
            trial.seconds = time.perf_counter() - start
            trial.status = "ok" if code == 0 else f"failed: exit {code}, see {trial.directory / 'train.log'}"
        trial.first_eval_loss, trial.eval_loss = _eval_losses(trial.directory)
        if trial.status in ("ok", "reused") and not trial.ok:
            trial.status = "failed: no finite held-out loss"
        return trial

    with ThreadPoolExecutor(max_workers=sweep.parallel) as pool:
        list(pool.map(run, trials))
    finished = [t for t in trials if t.ok]
    if not finished:
        raise PlanError([Diagnostic("error", f"every sweep trial failed; the first: {trials[0].status}",
                                    target.option_spans.get("sweep", target.span))])
    best = min(finished, key=lambda t: (t.eval_loss, t.number))
    chosen = options.trial(best.values)
    report = {
        "keys": list(sweep.swept),
        "trial_steps": sweep.trial_steps or options.steps,
        "chosen": {"trial": best.number, "values": best.values, "eval_loss": best.eval_loss},
        "trials": [{"trial": t.number, "values": t.values, "eval_loss": t.eval_loss,
                    "first_eval_loss": t.first_eval_loss, "seconds": round(t.seconds, 1), "status": t.status,
                    "directory": str(t.directory)} for t in trials],
    }
    report["table"] = table(trials, best, list(sweep.swept))
    write_text(folder / "sweep.json", json.dumps(report, indent=2) + "\n")
    write_text(folder / "sweep.txt", report["table"] + "\n")
    plot = _plot(trials, best, list(sweep.swept))
    if plot is not None:
        write_bytes(folder / "sweep.png", plot)
        report["plot"] = str(folder / "sweep.png")
    return chosen, report


def chosen_note(report: dict[str, Any]) -> list[str]:
    """Comment lines for `plan.resolved`: which trial won, and where the table is."""
    best = report["chosen"]
    values = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best["values"].items())
    return [f"# sweep: {len(report['trials'])} trials of {report['trial_steps']} steps; the lowest held-out loss "
            f"({best['eval_loss']:.4f}) had {values},",
            "# which the target below spells out; the trials are in sweep/sweep.txt"]


def table(trials: list[Trial], best: Trial, keys: list[str]) -> str:
    """The trials as a fixed-width text table, the chosen one marked with `*`."""
    header = ["trial", *keys, "held-out loss", "before", "seconds", "status"]
    rows = [header]
    for t in trials:
        rows.append([
            f"{t.number}{' *' if t is best else ''}",
            *(f"{t.values[k]:g}" if isinstance(t.values[k], float) else str(t.values[k]) for k in keys),
            f"{t.eval_loss:.4f}" if t.eval_loss is not None else "-",
            f"{t.first_eval_loss:.4f}" if t.first_eval_loss is not None else "-",
            f"{t.seconds:.0f}" if t.status == "ok" else "-",
            t.status,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i < len(header) - 1 else cell for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _thread_env(processes: int) -> dict[str, str]:
    """Trials running side by side share the cores: OMP_NUM_THREADS unless the user set it."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, processes)))}


def _events(directory: Path) -> list[dict[str, Any]]:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return events


def _finished(directory: Path) -> bool:
    """A run of this very program (emit kept its metrics) that reached its end."""
    return any(e.get("event") == "done" for e in _events(directory))


def _eval_losses(directory: Path) -> tuple[float | None, float | None]:
    """The held-out loss before training and at the end of the last run."""
    evals = [e for e in _events(directory) if e.get("event") == "eval" and "eval_loss" in e]
    if not evals:
        return None, None
    first = next((e["eval_loss"] for e in evals if e.get("step") == 0), None)
    return first, evals[-1]["eval_loss"]


def _plot(trials: list[Trial], best: Trial, keys: list[str]) -> bytes | None:
    """Held-out loss per trial as PNG bytes: against the value when one key varies, else one
    row per trial; the chosen trial is the red star. None without matplotlib."""
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [t for t in trials if t.ok]
    varying = [k for k in keys if len({t.values[k] for t in trials}) > 1]
    figure, axis = plt.subplots(figsize=(6, 1.5 + 0.3 * len(done)) if len(varying) != 1 else (6, 3.5), dpi=100)
    if len(varying) == 1:
        key = varying[0]
        done.sort(key=lambda t: t.values[key])
        values = [t.values[key] for t in done]
        axis.plot(values, [t.eval_loss for t in done], "o-")
        axis.plot([best.values[key]], [best.eval_loss], "r*", markersize=14, label="chosen")
        if key in _LOG_KEYS and min(values) > 0 and max(values) / min(values) >= 10:
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel("held-out loss")
        axis.legend()
    else:
        rows = range(len(done))
        axis.plot([t.eval_loss for t in done], rows, "o")
        axis.plot([best.eval_loss], [done.index(best)], "r*", markersize=14, label="chosen")
        axis.set_yticks(rows, [t.label() for t in done], fontsize=8)
        axis.set_xlabel("held-out loss")
        axis.legend()
    axis.set_title(f"sweep: held-out loss after {len(done)} trials")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
