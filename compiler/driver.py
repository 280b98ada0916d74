"""The compiler driver: runs a plan through its stages and can stop after any of them.

    parse -> ir -> capture (fx) -> passes (fx-after:<pass>) -> onnx | train

Every failure of a later stage (a model that cannot be captured, a selector that matches
nothing, a pass that cannot run, a verification goal that is missed) is turned into a
diagnostic at the plan line responsible, so the CLI prints it like a syntax error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler import ir
from compiler.explain import explain
from compiler.irdump import dump_ir
from compiler.validate import Checked, load_plan
from dsl.parser import parse_file
from dsl.source import Diagnostic, PlanError, Span

log = logging.getLogger(__name__)

EMIT_STAGES = ("ast", "ir", "resolved", "fx", "fx-after:<pass>", "onnx", "train")

#: Called with a short description of the stage being entered (the CLI shows it as progress).
Progress = Callable[[str], None]


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


def load_model(plan: ir.Plan, model: Any = None) -> Any:
    """The plan's eager model (or `model`, if the caller passed one), with tokenizer and inputs."""
    from compiler import frontend

    try:
        return frontend.load_model(plan.model, module=model)
    except frontend.FrontendError as error:
        raise error_at(plan.model.span, f"model '{plan.model.name}': {error}") from error


def module_table_of(loaded: Any) -> list[tuple[str, str]]:
    from compiler import frontend

    return frontend.module_table(loaded.model)


def capture_model(plan: ir.Plan, model: Any = None) -> Captured:
    """Load the plan's model (or use `model`) and capture it as an fx.GraphModule."""
    from compiler import frontend

    loaded = load_model(plan, model)
    try:
        graph = frontend.capture(loaded)
    except frontend.FrontendError as error:
        raise error_at(plan.model.span, f"model '{plan.model.name}': {error}") from error
    return Captured(loaded, graph, module_table_of(loaded))


def resolve_steps(plan: ir.Plan, table: list[tuple[str, str]], steps: list[ir.PassStep] | None = None) -> list[tuple[ir.PassStep, list[str]]]:
    """Each step with the module paths its selector matches; errors for empty matches."""
    from compiler.selectors import step_targets

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


def run_pipeline(plan: ir.Plan, captured: Captured, stop_after: str | None = None, progress: Progress | None = None):
    """Resolve each step's selector and run the passes; returns (graph, records, step targets)."""
    from compiler import frontend
    from passes.base import PassContext, PassError
    from passes.manager import PassManager
    from passes.registry import load_pass

    steps = list(plan.pipeline)
    if stop_after is not None:
        names = [step.name for step in steps]
        if stop_after not in names:
            raise PlanError([Diagnostic("error", f"--emit fx-after:{stop_after}: the pipeline has no pass '{stop_after}' (it has: {', '.join(names) or 'none'})", plan.span)])
        steps = steps[: names.index(stop_after) + 1]

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
                load_samples=lambda path, count: frontend.load_samples(loaded, path, count),
                cpu=target_cpu(plan),
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
    return graph, records, resolved


def target_cpu(plan: ir.Plan) -> str:
    """The CPU int8 weights are made for: the onnx target's `cpu`, else the compiling machine."""
    onnx = plan.target("onnx")
    return onnx.options.cpu if onnx is not None else "auto"


def _step_of(plan: ir.Plan, error: Exception) -> ir.PassStep | None:
    source = getattr(error, "source", None)
    return next((s for s in plan.pipeline if str(s.span) == source), None)


# ----------------------------------------------------------------------------- the driver


def compile_plan(
    path: str | Path,
    out_dir: str | Path | None = None,
    emit: str | None = None,
    model: Any = None,
    progress: Progress | None = None,
) -> Result:
    """Compile the plan at `path`; with `emit`, stop after that stage and return its text."""
    path = Path(path)
    note = progress or (lambda message: log.info(message))
    plan, _ = load_plan(path)
    if emit in ("ast", "ir", "resolved"):
        return Result(plan, text=emit_text(path, emit))
    if emit is not None and emit not in ("fx", "onnx", "train") and not emit.startswith("fx-after:"):
        raise PlanError([Diagnostic("error", f"unknown --emit stage '{emit}'; expected one of {', '.join(EMIT_STAGES)}", plan.span)])
    if emit in ("onnx", "train") and plan.target(emit) is None:
        raise PlanError([Diagnostic("error", f"--emit {emit}: the plan has no `target {emit} {{ ... }}`", plan.span)])

    kinds = [emit] if emit in ("onnx", "train") else [t.kind for t in plan.targets]
    if emit is None and not kinds:
        raise PlanError([Diagnostic("error", "the plan has no target: add `target onnx { }` or `target train { }` to compile it", plan.span)])
    if emit in (None, "onnx", "train") and out_dir is None:
        raise PlanError([Diagnostic("error", "compile needs an output directory (-o DIR)", plan.span)])

    if kinds == ["train"] and (emit is None or emit == "train"):
        # The training program rebuilds and compresses the eager model itself: no capture needed.
        note(f"loading model '{plan.model.name}'")
        loaded = load_model(plan, model)
        resolved = resolve_steps(plan, module_table_of(loaded))
        note("emitting the training program")
        return Result(plan, artifact=emit_train(plan, resolved, Path(out_dir)))

    if emit is None and set(kinds) == {"train", "onnx"}:
        return train_then_export(plan, Path(out_dir), model, note)
    if kinds == ["onnx"] and is_decoder_target(plan):
        note(f"loading model '{plan.model.name}'")
        loaded = load_model(plan, model)
        return emit_decoder(plan, loaded, Path(out_dir), note)

    note(f"loading and capturing model '{plan.model.name}'")
    captured = capture_model(plan, model)
    if emit == "fx":
        from passes.manager import graph_code

        return Result(plan, text=graph_code(captured.graph))
    stop_after = emit.split(":", 1)[1] if emit and emit.startswith("fx-after:") else None
    graph, records, resolved = run_pipeline(plan, captured, stop_after, note)
    if stop_after is not None:
        from passes.manager import graph_code

        return Result(plan, text=graph_code(graph), records=records)

    assert out_dir is not None
    out_dir = Path(out_dir)
    result = Result(plan, records=records)
    for kind in kinds:
        directory = out_dir if len(kinds) == 1 else out_dir / kind
        if kind == "train":
            note("emitting the training program")
            result.artifact = emit_train(plan, resolved, directory)
        else:
            note("exporting to ONNX, verifying against the eager model, benchmarking")
            onnx_result = emit_onnx(plan, captured, graph, records, directory)
            result.artifact, result.report, result.session = onnx_result.path, onnx_result.report, onnx_result.session
    return result


def train_then_export(plan: ir.Plan, out_dir: Path, model: Any, note: Progress) -> Result:
    """A plan with both targets: train (e.g. distil the compressed student), then export it.

    The training program saves the student in the original model's shapes, removed heads and
    channels as zeros; the plan's passes then run on those weights exactly as on pretrained ones
    (zeroed heads have the lowest importance, so the same ones are removed), and the ONNX model
    is verified against the ORIGINAL model, not against the student.
    """
    import dataclasses

    import torch

    note(f"loading model '{plan.model.name}'")
    original = load_model(plan, model)
    resolved = resolve_steps(plan, module_table_of(original))
    weights = trained_weights(plan, resolved, out_dir / "train", note)
    student = load_model(plan, model)
    try:
        student.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError) as error:
        train = plan.target("train")
        raise error_at(train.span if train else plan.span, f"cannot load the trained weights {weights}: {error}") from error
    if is_decoder_target(plan):  # a trained decoder is served as trained: verified against itself
        return emit_decoder(plan, student, out_dir / "onnx", note)

    from compiler import frontend

    note("capturing the trained model")
    try:
        graph = frontend.capture(student)
    except frontend.FrontendError as error:
        raise error_at(plan.model.span, f"model '{plan.model.name}': {error}") from error
    captured = Captured(student, graph, module_table_of(student))
    graph, records, _ = run_pipeline(plan, captured, progress=note)
    note("exporting to ONNX, verifying against the original model, benchmarking")
    reference = Captured(dataclasses.replace(student, model=original.model), graph, captured.table)
    onnx_result = emit_onnx(plan, reference, graph, records, out_dir / "onnx")
    return Result(plan, artifact=onnx_result.path, report=onnx_result.report, session=onnx_result.session, records=records)


def trained_weights(plan: ir.Plan, resolved: list, train_dir: Path, note: Progress) -> Path:
    """Run the plan's training program, or reuse the weights of an identical earlier run."""
    from backends.train import cache
    from backends.train.launch import launch

    train = plan.target("train")
    assert train is not None
    task = plan.model.task if plan.model.task != "auto" else "encoder" if plan.model.kind == "hf" else "causal_lm"
    corpus = cache.corpus_fingerprint(train.options, plan.model.base_dir, task)
    # The weights depend on the model, the pipeline and the training target, not on how the
    # onnx target exports or verifies them: a new verify goal reuses the trained weights.
    trained_by = plan.model_copy(update={"targets": (train,)})
    key = cache.plan_key(explain(trained_by), plan.model, corpus=corpus)
    cached = cache.cached_weights(key)
    if cached is not None:
        note(f"reusing trained weights {cached}")
        return cached
    directory = emit_train(plan, resolved, train_dir)
    note(f"training ({train_dir / 'train.py'}, torchrun)")
    code = launch(directory)
    weights = directory / train.options.save
    if code != 0 or not weights.is_file():
        raise error_at(train.span, f"the training program failed (exit {code}); its log is above, the program is in {directory}")
    return cache.store_weights(key, weights)


def is_decoder_target(plan: ir.Plan) -> bool:
    target = plan.target("onnx")
    return target is not None and target.options.decode is not None


def emit_decoder(plan: ir.Plan, loaded: Any, directory: Path, note: Progress) -> Result:
    """`target onnx { decode { ... } }`: a key/value-cache graph plus generation, quantized as planned.

    Decoder graphs take `quantize` steps only (applied to every projection of the model); the
    model's module table must show that the step's selector covers them.
    """
    from backends.onnx import artifact as onnx_artifact
    from backends.onnx.decoder_artifact import build_decoder_artifact
    from passes.options import Quantize

    target = plan.target("onnx")
    assert target is not None and target.options.decode is not None
    resolved = resolve_steps(plan, module_table_of(loaded))
    quantize: Quantize | None = None
    for step, targets in resolved:
        if not isinstance(step.options, Quantize) or quantize is not None:
            raise error_at(step.span, f"a decode target takes one quantize step and no other pass (got '{step.name}')")
        projections = {path for path, kind in module_table_of(loaded) if kind in ("Linear", "Conv1D")}
        if not projections <= set(targets):
            missing = sorted(projections - set(targets))[:3]
            raise error_at(step.selector.span if step.selector else step.span,
                           f"decoder quantization covers every projection; the selector leaves out {', '.join(missing)}, ...",
                           "select them all, e.g. `Linear` (or `Conv1D | name(\"lm_head\")` for GPT-2)")
        quantize = step.options
    decode = target.options.decode
    heldout = plan.model.base_dir / decode.heldout if decode.heldout else None
    note("exporting the decoder to ONNX, verifying generation against the eager model")
    summaries = [{"name": step.name, "summary": f"{quantize.scheme} weights for {len(targets)} projection(s)"} for step, targets in resolved]
    try:
        result = build_decoder_artifact(loaded.model, target.options, quantize, directory, heldout, summaries, explain(plan))
    except onnx_artifact.VerificationFailed as error:
        span = target.option_spans.get("verify.goal", target.option_spans.get("verify", target.span))
        raise error_at(span, f"verification failed: {error}", "no artifact was written") from error
    except onnx_artifact.ProviderError as error:
        raise error_at(target.option_spans.get("providers", target.span), str(error)) from error
    return Result(plan, artifact=result.path, report=result.report, session=result.session)


def emit_train(plan: ir.Plan, resolved: list, directory: Path) -> Path:
    from backends.train.emit import emit_training_program
    from passes.options import Partition

    target = plan.target("train")
    assert target is not None
    compression = [(step.options, targets) for step, targets in resolved if not isinstance(step.options, Partition)]
    partition = next((step.options for step, _ in resolved if isinstance(step.options, Partition)), None)
    return emit_training_program(target.options, plan.model, compression, partition, directory, explain(plan))


def emit_onnx(plan: ir.Plan, captured: Captured, graph: Any, records: list, directory: Path):
    from backends.onnx import artifact as onnx_artifact

    target = plan.target("onnx")
    assert target is not None
    summaries = [
        {"name": r.name, "summary": r.summary, "params": [r.before.params, r.after.params], "bytes": [r.before.bytes, r.after.bytes]}
        for r in records
    ]
    try:
        return onnx_artifact.build_onnx_artifact(
            graph, captured.loaded, target.options, directory, summaries, explain(plan)
        )
    except onnx_artifact.VerificationFailed as error:
        span = target.option_spans.get("verify.goal", target.span)
        raise error_at(span, f"verification failed: {error}", "no artifact was written") from error
    except onnx_artifact.ProviderError as error:
        span = target.option_spans.get("providers", target.span)
        raise error_at(span, str(error)) from error


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never half of it."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


__all__ = ["Checked", "Result", "compile_plan", "atomic_write_text"]
