"""`target train { ... }`: a standalone torchrun training program (train.py + launch.sh).

Imports nothing heavy at module level: `planc check` reads `TARGET.options` and `TARGET.check`.
Alone, the target only writes the program. With another target in the same plan (an onnx
export), it also runs the program, so the export gets the trained weights (`Job.shared`);
identical earlier runs are reused from the content-hashed cache. A `sweep { }` first runs its
trials (sweep.py) and continues with the best one's values, as if the plan had spelled them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from planc.backends.train.checks import TrainPlanError, check_batch_config, regularize_problems, sweep_problems
from planc.backends.train.options import TrainTarget
from planc.compiler import ir
from planc.compiler.targets import Built, Job
from planc.compiler.textdata import STDLIB
from planc.dsl.source import Diagnostic, PlanError, Span
from planc.passes.partition import Partition

#: Options a batch/mesh problem may name first, in the order they are looked for.
_PROBLEM_OPTIONS = ("global_batch", "micro_batch", "world_size", "rdzv_endpoint", "precision", "distill", "strategy")


def _span_of(train: ir.Target, problem: str) -> Span:
    """Point a training-configuration problem at the option it names first."""
    for option in _PROBLEM_OPTIONS:
        if (problem.startswith(option) or option in problem.split(":")[0]) and option in train.option_spans:
            return train.option_spans[option]
    return train.option_spans.get("strategy", train.span)


class TrainKind:
    kind: ClassVar[str] = "train"
    options: ClassVar[type[TrainTarget]] = TrainTarget
    stages: ClassVar[tuple[str, ...]] = ("train",)
    order: ClassVar[int] = 10  # before the targets that export what it trains

    def check(self, plan: ir.Plan, target: ir.Target) -> list[Diagnostic]:
        options: TrainTarget = target.options  # type: ignore[assignment]
        problems = []
        if options.data.path != STDLIB and not (plan.model.base_dir / options.data.path).exists():
            problems.append(Diagnostic("error", f"training data not found: {options.data.path}",
                                       target.option_spans.get("data.path", target.span)))
        partition = next((s.options for s in plan.pipeline if isinstance(s.options, Partition)), None)
        problems += [Diagnostic("error", problem, _span_of(target, problem)) for problem in check_batch_config(options, partition)]
        return problems + regularize_problems(plan, target) + sweep_problems(target)

    def capture(self, target: ir.Target, loaded: object) -> None:
        """The training program trains the model's own graph: the driver's capture shows it."""
        return None

    def transform(self, job: Job, target: ir.Target, loaded: object, stop_after: str) -> None:
        """Its passes are the driver's pipeline (what `--emit fx-after:NAME` runs)."""
        return None

    def build(self, job: Job, target: ir.Target) -> Built:
        job.progress(f"loading model '{job.plan.model.name}'")
        loaded = job.load()
        resolved = job.resolve(loaded)
        report: dict = {}
        notes: list[str] = []
        keep: tuple[str, ...] = ()
        if target.options.sweep is not None:  # type: ignore[attr-defined]
            from planc.backends.train.sweep import chosen_note

            target, report = self.sweep(job, target, resolved)
            notes, keep = chosen_note(report["sweep"]), ("sweep",)
        if not job.others:
            job.progress("emitting the training program")
            return Built(self.emit(job.plan, target, resolved, job.out_dir, notes, keep), report)
        job.shared["weights"] = self.trained_weights(job, target, resolved, loaded.task, notes, keep)
        #: Distilled weights learned from the plan's model, which stays the reference they are verified
        #: against; weights trained on data alone are the model (the `model` line's are their initial values).
        job.shared["distilled"] = target.options.distill is not None  # type: ignore[attr-defined]
        return Built(job.out_dir, report)

    def sweep(self, job: Job, target: ir.Target, resolved: list) -> tuple[ir.Target, dict]:
        """Run the sweep's trials; the target (and job.plan) with the chosen values from now on."""
        from planc.backends.train.sweep import run_sweep

        def emit_trial(trial: TrainTarget, directory: Path) -> Path:
            trial_target = target.model_copy(update={"options": trial})
            return self.emit(_with_target(job.plan, target, trial_target), trial_target, resolved, directory,
                             keep=("train.log",))

        chosen, report = run_sweep(target, job.out_dir, emit_trial, job.progress)
        resolved_target = target.model_copy(update={"options": chosen})
        job.plan = _with_target(job.plan, target, resolved_target)
        return resolved_target, {"sweep": report}

    @staticmethod
    def emit(plan: ir.Plan, target: ir.Target, resolved: list, directory: Path, notes: list[str] | None = None,
             keep: tuple[str, ...] = ()) -> Path:
        """Write the program; `notes` are comment lines above plan.resolved, `keep` entries of
        an earlier `directory` to keep (see emit_training_program)."""
        from planc.backends.train.emit import emit_training_program
        from planc.compiler.explain import explain

        compression = [(step.options, targets) for step, targets in resolved if not isinstance(step.options, Partition)]
        partition = next((step.options for step, _ in resolved if isinstance(step.options, Partition)), None)
        text = "".join(f"{line}\n" for line in notes or ()) + explain(plan)
        options: TrainTarget = target.options  # type: ignore[assignment]
        try:
            return emit_training_program(options, plan.model, compression, partition, directory, text, keep=keep)
        except TrainPlanError as error:
            problems = error.args[0] if error.args and isinstance(error.args[0], list) else [str(error)]
            raise PlanError([Diagnostic("error", str(p), _span_of(target, str(p))) for p in problems]) from error

    def trained_weights(self, job: Job, target: ir.Target, resolved: list, task: str, notes: list[str] | None = None,
                        keep: tuple[str, ...] = ()) -> Path:
        """Run the training program, or reuse the weights of an identical earlier run.

        `task` is the model's resolved task (`encoder` | `causal_lm`): it decides the corpus.
        """
        from planc.backends.train import cache
        from planc.backends.train.launch import launch
        from planc.compiler.explain import explain

        plan, options = job.plan, target.options
        corpus = cache.corpus_fingerprint(options, plan.model.base_dir, task)  # type: ignore[arg-type]
        # The weights depend on the model, the pipeline and the training target, not on how
        # other targets export or verify them: a new verify goal reuses the trained weights.
        trained_by = plan.model_copy(update={"targets": (target,)})
        key = cache.plan_key(explain(trained_by), plan.model, corpus=corpus)
        cached = cache.cached_weights(key)
        if cached is not None:
            job.progress(f"reusing trained weights {cached}")
            return cached
        directory = self.emit(plan, target, resolved, job.out_dir, notes, keep)
        job.progress(f"training ({directory / 'train.py'}, torchrun)")
        code = launch(directory)
        weights = directory / options.save  # type: ignore[union-attr]
        if code != 0 or not weights.is_file():
            raise PlanError([Diagnostic("error", f"the training program failed (exit {code}); its log is above, the program is in {directory}", target.span)])
        return cache.store_weights(key, weights)


def _with_target(plan: ir.Plan, old: ir.Target, new: ir.Target) -> ir.Plan:
    return plan.model_copy(update={"targets": tuple(new if t == old else t for t in plan.targets)})


TARGET = TrainKind()

__all__ = ["TARGET", "TrainKind"]
