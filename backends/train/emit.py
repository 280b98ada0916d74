"""Emit the training program of `target train`: DIR/train.py, launch.sh, planc_runtime/ (the
helper package train.py imports, with everyday_text.py, the grammar of its `everyday` corpus),
plan.resolved.

The emitter resolves everything the program needs (model location, mesh sizes, compressed
modules) and renders it; it imports no torch, so it runs as fast as `planc check`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planc.backends.train.cache import RUNTIME, runtime_files, runtime_sources
from planc.backends.train.checks import TrainPlanError, mesh_of, tensor_parallel_size
from planc.backends.train.options import TrainTarget
from planc.backends.train.render import Program, render_launch_sh, render_train_py
from planc.compiler.model_source import ModelSourceError, declared_task, spec_of
from planc.compiler.publish import staged_dir
from planc.passes.cast import Cast
from planc.passes.lowrank import LowRank
from planc.passes.options import PassOptions
from planc.passes.partition import Partition
from planc.passes.prune import Prune
from planc.passes.quantize import Quantize
from planc.passes.share import Share

if TYPE_CHECKING:  # compiler.ir imports this package's options: no import cycle at run time
    from planc.compiler.ir import ModelSource

log = logging.getLogger(__name__)

#: Files a previous emission's run produced; kept when the program itself did not change.
_RUN_STATE = ("metrics.jsonl",)


def emit_training_program(
    target: TrainTarget,
    model: ModelSource,
    compression: list[tuple[PassOptions, list[str]]],
    partition: Partition | None,
    out_dir: Path,
    plan_resolved: str,
    stage_cuts: list[int] | None = None,
    keep: Sequence[str] = (),
) -> Path:
    """Write the training program into `out_dir` (atomically: a temporary folder, then a rename).

    `compression` holds the plan's prune/quantize/lowrank steps with the module paths their
    selectors matched; `partition` (and `stage_cuts`, the first block of every stage after the
    first, if the partition pass computed them) shapes the pipeline. Re-emitting an unchanged
    program keeps the previous run's checkpoints, so `planc train` resumes it; `keep` names
    entries of an earlier `out_dir` kept whatever changed (a sweep's trials).
    Raises TrainPlanError with every problem found.
    """
    mesh = mesh_of(target, partition)
    spec, task = model_spec(model)
    problems = _feature_problems(target, spec, task, compression, mesh.pp, stage_cuts, model.base_dir)
    if problems:
        raise TrainPlanError(problems)
    data_path = target.data.path
    if data_path != "stdlib":
        data_path = str((model.base_dir / data_path).resolve())
    exclude = tuple(str((model.base_dir / name).resolve()) for name in target.data.exclude)
    program = Program(
        target=target,
        mesh=mesh,
        model=spec,
        task=task,
        data_path=data_path,
        compression=[(o, list(p)) for o, p in compression if isinstance(o, (Share, Prune, Quantize, LowRank))],
        stage_cuts=list(stage_cuts) if stage_cuts else None,
        plan_name=Path(model.span.file).name,
        exclude_paths=exclude,
    )
    for options, _ in compression:
        if isinstance(options, Cast):
            log.info("cast steps shape the exported model; training precision is target train's `precision`")

    out_dir = Path(out_dir)
    with staged_dir(out_dir, keep=lambda new: [*_kept_run_state(out_dir, new, target), *keep]) as tmp:
        (tmp / "train.py").write_text(render_train_py(program))
        launch = tmp / "launch.sh"
        launch.write_text(render_launch_sh(target, program.plan_name))
        launch.chmod(0o755)
        _copy_runtime(tmp / RUNTIME.name)
        (tmp / "plan.resolved").write_text(plan_resolved)
    log.info("wrote training program %s", out_dir / "train.py")
    return out_dir


def _copy_runtime(dest: Path) -> None:
    """The runtime package, file by file (no bytecode caches), and the modules it shares with
    planc (`SHARED_MODULES`), into `dest`."""
    for name, path in runtime_sources().items():
        copy = dest / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)


def _program_code(folder: Path) -> dict[str, bytes] | None:
    """train.py and the runtime package's files of an emitted program, by path; None if absent."""
    runtime = folder / RUNTIME.name
    if not (folder / "train.py").is_file() or not runtime.is_dir():
        return None
    code = {"train.py": (folder / "train.py").read_bytes()}
    for path in runtime_files(runtime):
        code[f"{RUNTIME.name}/{path.relative_to(runtime).as_posix()}"] = path.read_bytes()
    return code


def _kept_run_state(old: Path, new: Path, target: TrainTarget) -> list[str]:
    """Checkpoints and metrics of a previous run, if it ran exactly the program just rendered."""
    previous = _program_code(old)
    same = previous is not None and previous == _program_code(new)
    return [target.checkpoint.dir, *_RUN_STATE] if same else []


def model_spec(model: ModelSource) -> tuple[dict[str, Any], str]:
    """How the program rebuilds the model (`compiler/model_source.py`, which it carries) and its
    task; a factory with `task = auto` is run once to tell (the compiler's probe)."""
    try:
        task = declared_task(model)
        if task is None:
            from planc.compiler.model import model_task  # loads torch: only for this case

            task = model_task(model)
        return spec_of(model, task), task
    except ModelSourceError as error:
        raise TrainPlanError([str(error)]) from error


def _feature_problems(
    target: TrainTarget,
    spec: dict[str, Any],
    task: str,
    compression: list[tuple[PassOptions, list[str]]],
    stages: int,
    stage_cuts: list[int] | None,
    base_dir: Path | None = None,
) -> list[str]:
    """Combinations the program cannot run, reported before anything is written."""
    problems = []
    strategy = set(target.strategy)
    encoder_terms = {"embedding", "hidden", "attention", "similarity"}
    if task == "encoder":
        if target.distill is None:
            problems.append(
                "an encoder has no next-token loss to train on: add distill { losses = [embedding] } "
                "to train it against the original model"
            )
        elif not encoder_terms & set(target.distill.losses) or "logits" in target.distill.losses:
            problems.append("an encoder has no logits: distill it with losses among [embedding, similarity, hidden, attention]")
        if strategy & {"pipeline", "tensor"}:
            problems.append("pipeline and tensor parallelism split GPT-style decoders; use ddp or fsdp for an encoder")
        if spec["kind"] != "hf":
            problems.append("encoder distillation reads sentences with the model's own tokenizer: it needs a Hugging Face model")
        elif target.data.tokenizer != "model":
            problems.append("an encoder trains on sentences tokenized by its own tokenizer: set data { tokenizer = model }")
        for name in target.data.exclude:
            if base_dir is not None and not (base_dir / name).is_file():
                problems.append(f"data.exclude names {name}, which does not exist")
    elif target.distill is not None and {"similarity", "attention"} & set(target.distill.losses):
        problems.append(
            "similarity and attention distillation are for encoders; distill a decoder with logits, hidden or embedding"
        )
    if target.data.tokenizer == "model" and spec["kind"] != "hf":
        problems.append("data tokenizer = model needs a Hugging Face model; use tokenizer = bytes for a factory model")
    for options, paths in compression:
        if isinstance(options, (Prune, Quantize, LowRank)) and not paths:
            problems.append(f"the {options.name} step selects no module")
        tp = tensor_parallel_size(target) or 1
        if isinstance(options, Share) and "tensor" in strategy and options.kv_heads % tp:
            problems.append(f"tensor parallelism splits the key/value heads over {tp} ranks: "
                            f"share's kv_heads = {options.kv_heads} must be a multiple of {tp}")
    if stage_cuts is not None:
        if len(stage_cuts) != stages - 1 or list(stage_cuts) != sorted(set(stage_cuts)) or min(stage_cuts, default=1) < 1:
            problems.append(
                f"pipeline cut points {stage_cuts} do not split the blocks into {stages} stages in order"
            )
    return problems
