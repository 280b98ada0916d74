"""The compiler driver: runs a plan through its stages and can stop after any of them.

    parse -> ir -> capture (fx) -> passes (fx-after:<pass>) -> onnx | train

Every failure of a later stage (a model that cannot be captured, a selector that matches
nothing, a pass that cannot run, a verification goal that is missed) is turned into a
diagnostic at the plan line responsible, so the CLI prints it like a syntax error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planc.compiler import ir
from planc.compiler.explain import explain
from planc.compiler.footprint import return_freed_memory, streams_weights
from planc.compiler.irdump import dump_ir
from planc.compiler.mixed_precision import resolve_precision
from planc.compiler.targets import Job, Progress, target_kinds
from planc.compiler.validate import Checked, load_plan
from planc.dsl.parser import parse_file
from planc.dsl.source import Diagnostic, PlanError, Span

log = logging.getLogger(__name__)

#: Stages that need no model, and stages that print a graph; target kinds add theirs.
FRONT_STAGES = ("ast", "ir", "resolved")
GRAPH_STAGES = ("fx", "fx-after:<pass>")


@dataclass
class Result:
    """What a compile produced: the artifact directory, its report, and a ready session."""

    plan: ir.Plan
    artifact: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    session: Any = None
    text: str | None = None  # for --emit stages that print instead of writing
    records: list = field(default_factory=list)


def error_at(span: Span, message: str, *notes: str) -> PlanError:
    return PlanError([Diagnostic("error", message, span, tuple(notes))])


# ----------------------------------------------------------------------------- front stages


def emit_text(path: Path, stage: str) -> str:
    """The text of a stage that needs no torch: ast, ir, resolved."""
    if stage == "ast":
        return repr_ast(path)
    plan, _ = load_plan(path)
    return dump_ir(plan) if stage == "ir" else explain(plan)


def repr_ast(path: Path) -> str:
    document = parse_file(path)
    return "\n".join(repr(statement) for statement in document.statements) + "\n"


# ----------------------------------------------------------------------------- graph stages


@dataclass
class Captured:
    """A loaded model, its captured graph and the module table selectors match against."""

    loaded: Any
    graph: Any
    table: list[tuple[str, str]]


def load_model(plan: ir.Plan, model: Any = None, rewrite: bool = True, stream: bool = False) -> Any:
    """The plan's eager model (or `model`, if the caller passed one), with tokenizer and inputs,
    rewritten by the plan's architecture passes (`share`) unless `rewrite` is False. `stream`:
    the compile's own load, whose Linear weights stay in the checkpoint when the plan streams
    (`streams_weights`); such a model runs only inside `deferred.streamed`."""
    from planc.compiler import model as model_source

    try:
        loaded = model_source.load_model(plan.model, module=model, defer_linear_weights=stream and streams_weights(plan))
    except model_source.FrontendError as error:
        raise error_at(plan.model.span, f"model '{plan.model.name}': {error}") from error
    return rewrite_model(plan, loaded, copy=model is not None) if rewrite else loaded


def rewrite_model(plan: ir.Plan, loaded: Any, copy: bool = False) -> Any:
    """Apply the pipeline's model-rewriting steps (`PassOptions.rewrites_model`: share) to the
    eager model, before capture: the one hook through which an architecture change reaches
    every target (the ONNX export, a decoder's cache graph, the graph passes, the training
    target's module table and the compile after training, whose trained weights have the
    rewritten shapes). `copy` leaves a model the caller passed in untouched."""
    import copy as copying

    from planc.passes.registry import load_pass

    steps = [step for step in plan.pipeline if step.options.rewrites_model]
    if not steps:
        return loaded
    if copy:
        loaded = dataclasses.replace(loaded, model=copying.deepcopy(loaded.model), rewrites=[])
    for step in steps:
        before = _size(loaded.model)
        try:
            summary, details = load_pass(step.options).apply(loaded.model)  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - every failure becomes a diagnostic at the step
            option = getattr(error, "option", None)
            message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            raise error_at(step.option_spans.get(option, step.span) if option else step.span, message) from error
        log.info("%s: %s", step.name, summary)
        after = _size(loaded.model)
        loaded.rewrites.append({"name": step.name, "summary": summary, "source": str(step.span),
                                "params": [before[0], after[0]], "bytes": [before[1], after[1]], **details})
    return loaded


def _size(model: Any) -> tuple[int, int]:
    """(parameter elements, bytes) of an eager model."""
    return (sum(p.numel() for p in model.parameters()), sum(p.numel() * p.element_size() for p in model.parameters()))


def module_table_of(loaded: Any) -> list[tuple[str, str]]:
    from planc.compiler import model as model_source

    return model_source.module_table(loaded.model)


def capture_model(plan: ir.Plan, model: Any = None) -> Captured:
    """Load the plan's model (or use `model`) and capture it as an fx.GraphModule."""
    return capture_loaded(plan, load_model(plan, model))


def capture_loaded(plan: ir.Plan, loaded: Any) -> Captured:
    """Capture a loaded model; a model that cannot be captured is an error at the model line."""
    from planc.compiler import model as model_source
    from planc.passes.graph_utils import conv1d_as_linear

    try:
        graph = model_source.capture(loaded)
    except model_source.FrontendError as error:
        raise error_at(plan.model.span, f"model '{plan.model.name}': {error}") from error
    conv1d_as_linear(graph)  # GPT-2's projections become Linears for every pass
    return Captured(loaded, graph, module_table_of(loaded))


def resolve_steps(plan: ir.Plan, table: list[tuple[str, str]], steps: list[ir.PassStep] | None = None) -> list[tuple[ir.PassStep, list[str]]]:
    """Each step with the module paths its selector matches; errors for empty matches."""
    from planc.compiler.selectors import step_targets

    diagnostics: list[Diagnostic] = []
    resolved = []
    for step in plan.pipeline if steps is None else steps:
        targets, problems = step_targets(step, table, plan)
        diagnostics.extend(problems)
        resolved.append((step, sorted(targets)))
    for warning in (d for d in diagnostics if d.severity == "warning"):
        log.warning(warning.render(None))
    if any(d.severity == "error" for d in diagnostics):
        raise PlanError(diagnostics)
    return resolved


def run_pipeline(
    plan: ir.Plan,
    captured: Captured,
    stop_after: str | None = None,
    progress: Progress | None = None,
    samples: list | None = None,
    steps: list[ir.PassStep] | None = None,
    cpu: str | None = None,
):
    """Resolve each step's selector and run the passes; returns (graph, records, step targets).

    `samples` replaces every calibrated step's calibration data (the mixed-precision search
    builds its candidates on one fold of the calibration samples and checks them on the other);
    `steps` runs only those steps of the pipeline (a decoder's pruning, before its export);
    `cpu` replaces the plan's target CPU (the search scores with machine-independent arithmetic).
    """
    from planc.compiler import model as model_source
    from planc.passes.base import PassContext, PassError
    from planc.passes.manager import PassManager
    from planc.passes.registry import load_pass

    steps = list(plan.pipeline if steps is None else steps)
    if stop_after is not None:
        names = [step.name for step in steps]
        if stop_after not in names:
            raise PlanError([Diagnostic("error", f"--emit fx-after:{stop_after}: the pipeline has no pass '{stop_after}' (it has: {', '.join(names) or 'none'})", plan.span)])
        steps = steps[: names.index(stop_after) + 1]
    steps = [step for step in steps if not step.options.rewrites_model]  # applied when the model was loaded

    loaded = captured.loaded
    resolved = resolve_steps(plan, captured.table, steps)
    scheduled = [
        (
            load_pass(step.options),
            PassContext(
                model=loaded.model,
                example_inputs=loaded.example_inputs,
                targets=frozenset(targets),
                source=str(step.span),
                load_samples=(lambda path, count: model_source.load_samples(loaded, path, count)) if samples is None
                else (lambda path, count: samples),
                cpu=cpu or target_cpu(plan),
            ),
        )
        for step, targets in resolved
    ]
    if progress:
        progress(f"running {len(scheduled)} pass(es): {', '.join(s.name for s, _ in resolved)}")
    try:
        graph, records = PassManager().run(captured.graph, scheduled)
    except PassError as error:
        step = _step_of(plan, error)
        raise error_at(step.span if step else plan.span, error.message) from error
    return graph, _rewrite_records(loaded) + records, resolved


def _rewrite_records(loaded: Any) -> list:
    """The model rewrites (applied at load) as records beside the graph passes', for explain and reports."""
    from planc.passes.manager import GraphStats, PassRecord

    return [
        PassRecord(name=r["name"], summary=r["summary"], source=r["source"],
                   details={k: v for k, v in r.items() if k not in ("name", "summary", "source", "params", "bytes")},
                   before=GraphStats(0, r["params"][0], r["bytes"][0]), after=GraphStats(0, r["params"][1], r["bytes"][1]))
        for r in loaded.rewrites
    ]


def target_cpu(plan: ir.Plan) -> str:
    """The CPU int8 weights are made for: a target's `cpu` option, else the compiling machine."""
    return next((t.options.cpu for t in plan.targets if hasattr(t.options, "cpu")), "auto")


def _step_of(plan: ir.Plan, error: Exception) -> ir.PassStep | None:
    source = getattr(error, "source", None)
    return next((s for s in plan.pipeline if str(s.span) == source), None)


# ----------------------------------------------------------------------------- the driver


def make_job(plan: ir.Plan, out_dir: Path, model: Any = None, progress: Progress | None = None) -> Job:
    """A target's view of this compile: the driver's stages as callables (see `Job`)."""

    def run_passes(captured: Captured, steps: list[ir.PassStep] | None = None) -> tuple[Any, list]:
        graph, records, _ = run_pipeline(plan, captured, progress=progress, steps=steps)
        return graph, records

    return Job(
        plan=plan,
        out_dir=out_dir,
        progress=progress or (lambda message: log.info(message)),
        load=lambda: load_model(plan, model, stream=True),
        load_original=lambda: load_model(plan, model, rewrite=False, stream=True),
        table=module_table_of,
        resolve=lambda loaded: resolve_steps(plan, module_table_of(loaded)),
        capture=lambda loaded: capture_loaded(plan, loaded),
        run_passes=run_passes,
    )


def resolve_fallback(plan: ir.Plan, job: Job) -> tuple[ir.Plan, dict[str, Any] | None]:
    """The plan with a `fallback = int8` step resolved into its int4 and int8 steps (the
    mixed-precision search, run on the driver's pipeline), and what the search measured."""
    return resolve_precision(plan, job, lambda trial, captured, samples, cpu: run_pipeline(trial, captured, samples=samples, cpu=cpu)[0],
                             cpu=target_cpu(plan))


def emit_stages() -> tuple[str, ...]:
    """Every `--emit` stage: the driver's own, then each target kind's."""
    return FRONT_STAGES + GRAPH_STAGES + tuple(stage for kind in target_kinds().values() for stage in kind.stages)


def graph_text(plan: ir.Plan, job: Job, emit: str) -> Result:
    """`--emit fx` / `--emit fx-after:PASS`: the captured graph, or the graph after that pass.

    A target may capture and transform its own graph (a decoder's key/value-cache graph);
    otherwise the model is captured and the pipeline run up to the pass.
    """
    from planc.passes.manager import graph_code

    kinds = target_kinds()
    stop_after = emit.split(":", 1)[1] if emit.startswith("fx-after:") else None
    job.progress(f"loading and capturing model '{plan.model.name}'")
    loaded = job.load()
    for target in plan.targets:
        kind = kinds[target.kind]
        graph = kind.capture(target, loaded) if stop_after is None else kind.transform(job, target, loaded, stop_after)
        if graph is not None:
            return Result(plan, text=graph_code(graph))
    captured = job.capture(loaded)
    if stop_after is None:
        return Result(plan, text=graph_code(captured.graph))
    graph, records, _ = run_pipeline(plan, captured, stop_after, job.progress)
    return Result(plan, text=graph_code(graph), records=records)


def compile_plan(
    path: str | Path,
    out_dir: str | Path | None = None,
    emit: str | None = None,
    model: Any = None,
    progress: Progress | None = None,
) -> Result:
    """Compile the plan at `path`; with `emit`, stop after that stage and return its text.

    Targets build in their kinds' order (a trainer before the export of what it trained), each
    into `out_dir`, or `out_dir/<kind>` when the plan has several; `--emit KIND` builds one.
    """
    path = Path(path)
    plan, _ = load_plan(path)
    if emit in FRONT_STAGES:
        return Result(plan, text=emit_text(path, emit))
    kinds = target_kinds()
    by_stage = {stage: kind for kind in kinds.values() for stage in kind.stages}
    is_graph_stage = emit == "fx" or (emit or "").startswith("fx-after:")
    if emit is not None and not is_graph_stage and emit not in by_stage:
        raise error_at(plan.span, f"unknown --emit stage '{emit}'; expected one of {', '.join(emit_stages())}")
    job = make_job(plan, Path(out_dir) if out_dir is not None else Path("."), model, progress)
    if is_graph_stage:
        return graph_text(plan, job, emit)  # type: ignore[arg-type]

    selected = [t for t in plan.targets if emit is None or t.kind == by_stage[emit].kind]
    if emit is not None and not selected:
        raise error_at(plan.span, f"--emit {emit}: the plan has no `target {by_stage[emit].kind} {{ ... }}`")
    if not selected:
        raise error_at(plan.span, "the plan has no target: add `target onnx { }` or `target train { }` to compile it")
    if out_dir is None:
        raise error_at(plan.span, "compile needs an output directory (-o DIR)")
    selected.sort(key=lambda t: kinds[t.kind].order)
    footprint = check_footprint(plan, job.progress)
    if streams_weights(plan):
        return_freed_memory()
    plan, precision = resolve_fallback(plan, job)
    if precision is not None:  # the pipeline now spells out the int4/int8 assignment
        job = dataclasses.replace(make_job(plan, job.out_dir, model, progress), started=job.started)
        job.shared["mixed_precision"] = precision
    result = Result(plan)
    for target in selected:
        job.out_dir = Path(out_dir) if len(selected) == 1 else Path(out_dir) / target.kind
        job.others = tuple(t.kind for t in selected if t is not target)
        built = kinds[target.kind].build(job, target)
        result.artifact, result.report, result.session = built.artifact, built.report, built.session
        result.records = built.records or result.records
    if footprint is not None and result.artifact is not None:
        result.report["memory"] = record_peak(result.artifact, footprint)
    return result


def check_footprint(plan: ir.Plan, progress: Progress) -> Any:
    """Predict the compile's peak memory from the checkpoint's headers, before loading anything;
    a compile that would not fit the memory available now is an error at the `model` line."""
    from planc.compiler.footprint import GB, fit_notes, plan_footprint

    footprint = plan_footprint(plan)
    if footprint is None:
        return None
    progress(f"model '{plan.model.name}': {footprint.describe()}")
    log.info("model '%s': %s", plan.model.name, footprint.describe())
    if not footprint.fits:
        raise error_at(plan.model.span, f"model '{plan.model.name}' does not fit this machine's memory: the compile needs "
                       f"about {footprint.peak_bytes / GB:.1f} GB, {footprint.available_bytes / GB:.1f} GB is available",
                       *fit_notes(footprint))
    if not footprint.spill_fits:
        raise error_at(plan.model.span, f"model '{plan.model.name}': the pruned weights need {footprint.spill_bytes / GB:.1f} GB "
                       f"of temporary disk, {footprint.spill_free_bytes / GB:.1f} GB is free",
                       "a streamed compile keeps pruned weights in fp32 in a temporary file until they are written out",
                       "point TMPDIR at a disk with more room")
    return footprint


def record_peak(artifact: Path, footprint: Any) -> dict[str, Any]:
    """The predicted and the measured peak memory, added to the artifact's report.json (replaced
    atomically: the artifact is already published)."""
    import json
    import os

    from planc.compiler.footprint import peak_rss

    entry = {**footprint.as_dict(), "measured_peak_bytes": peak_rss()}
    entry["measured_over_predicted"] = round(entry["measured_peak_bytes"] / footprint.peak_bytes, 3)
    report_file = artifact / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        report["memory"] = entry
        tmp = report_file.with_name(".report.json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, report_file)
    return entry


__all__ = ["Checked", "Result", "compile_plan"]
