"""Give a parsed plan its meaning: syntax tree -> typed IR, collecting every error on the way.

Pass and target options are checked by their own pydantic models; each validation error is
mapped back to the span of the option that caused it. Rules that involve more than one
statement (files that must exist, batch arithmetic, bf16 on a CPU-only target) are checked here
and by each target kind's `check`, so `planc check` catches them without loading torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from planc.compiler import ir
from planc.compiler.targets import target_kinds
from planc.dsl import ast
from planc.dsl.parser import parse_file
from planc.dsl.source import Diagnostic, PlanError, Source, Span, did_you_mean
from planc.compiler.textdata import STDLIB
from planc.passes.options import pass_options
from planc.passes.prune import Prune

SELECTOR_FUNCTIONS = ("name", "regex", "layers", "type")
MODEL_SOURCES = ("factory", "hf")


@dataclass
class Checked:
    """The outcome of checking one plan file: the IR (if no errors) and every diagnostic."""

    plan: ir.Plan | None
    diagnostics: list[Diagnostic]
    sources: dict[str, Source] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.plan is not None and not any(d.severity == "error" for d in self.diagnostics)


def check_file(path: str | Path) -> Checked:
    """Parse, resolve includes and validate a plan file. Never raises for a bad plan."""
    validator = _Validator()
    try:
        statements = validator.load(Path(path), stack=())
    except PlanError as error:
        return Checked(None, error.diagnostics, validator.sources)
    plan = validator.plan(statements, Path(path))
    diagnostics = sorted(validator.diagnostics, key=lambda d: (d.span.file != str(path), d.span))
    errors = [d for d in diagnostics if d.severity == "error"]
    return Checked(None if errors else plan, diagnostics, validator.sources)


def load_plan(path: str | Path) -> tuple[ir.Plan, Checked]:
    """Like `check_file`, but raise `PlanError` when the plan has errors."""
    checked = check_file(path)
    if not checked.ok:
        raise PlanError(checked.diagnostics)
    assert checked.plan is not None
    return checked.plan, checked


# ----------------------------------------------------------------------------- values


def python_value(value: ast.Value) -> Any:
    """The Python value an option receives: 50% -> 0.5, true -> True, [a, b] -> ['a', 'b']."""
    if isinstance(value, ast.Number):
        return value.value
    if isinstance(value, ast.String):
        return value.value
    if isinstance(value, ast.Ident):
        return {"true": True, "false": False, "none": None}.get(value.name, value.name)
    if isinstance(value, ast.Range):
        return [value.first.value, value.last.value]
    return [python_value(item) for item in value.items]


@dataclass
class _Options:
    """A block turned into a dict for pydantic, with the span of every key and value."""

    data: dict[str, Any]
    key_spans: dict[tuple, Span]
    value_spans: dict[tuple, Span]


def _block_options(block: ast.Block, diagnostics: list[Diagnostic], prefix: tuple = ()) -> _Options:
    options = _Options({}, {}, {})
    for entry in block.entries:
        loc = prefix + (entry.key if not isinstance(entry, ast.InputDecl) else entry.name,)
        if loc[-1] in options.data:
            diagnostics.append(Diagnostic("error", f"option '{loc[-1]}' is given twice", entry.span))
            continue
        if isinstance(entry, ast.Option):
            options.data[loc[-1]] = python_value(entry.value)
            options.key_spans[loc] = entry.key_span
            options.value_spans[loc] = entry.value.span
            if isinstance(entry.value, ast.ListValue):
                for index, item in enumerate(entry.value.items):
                    options.value_spans[loc + (index,)] = item.span
        elif isinstance(entry, ast.SubBlock):
            nested = _block_options(entry.block, diagnostics, loc)
            options.data[loc[-1]] = nested.data
            options.key_spans.update(nested.key_spans)
            options.value_spans.update(nested.value_spans)
            options.key_spans[loc] = entry.key_span
            options.value_spans[loc] = entry.block.span
        else:
            diagnostics.append(
                Diagnostic("error", f"an input declaration ('{entry.name}: ...') belongs in the model's inputs block", entry.span)
            )
    return options


def _validate_options(
    model: type[BaseModel], options: _Options, what: str, anchor: Span, diagnostics: list[Diagnostic]
) -> BaseModel | None:
    """Build `model` from options; map every pydantic error to the span it is about."""
    try:
        return model(**options.data)
    except ValidationError as error:
        for problem in error.errors():
            diagnostics.append(_map_error(model, problem, options, what, anchor))
        return None


def _map_error(model: type[BaseModel], problem: dict, options: _Options, what: str, anchor: Span) -> Diagnostic:
    loc = tuple(problem["loc"])
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        fields = list(_fields_at(model, loc[:-1]))
        span = options.key_spans.get(loc, anchor)
        return Diagnostic("error", f"unknown option '{loc[-1]}' for {what}", span, did_you_mean(str(loc[-1]), fields))
    if not loc:  # a model-level check (model_validator)
        return Diagnostic("error", f"{what}: {message}", anchor)
    span = options.value_spans.get(loc) or options.value_spans.get(loc[:1]) or anchor
    name = ".".join(str(part) for part in loc if not isinstance(part, int))
    if problem["type"] == "literal_error":
        message = message.replace("Input should be", "expected")
    elif problem["type"] == "missing":
        message = "is required"
    return Diagnostic("error", f"option '{name}' of {what}: {message}", span)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that `loc` points into, for 'did you mean'."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if info is None:
            return []
        annotation = info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields)


# ----------------------------------------------------------------------------- the validator


class _Validator:
    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []
        self.sources: dict[str, Source] = {}

    def error(self, message: str, span: Span, notes: tuple[str, ...] = ()) -> None:
        self.diagnostics.append(Diagnostic("error", message, span, notes))

    def warning(self, message: str, span: Span, notes: tuple[str, ...] = ()) -> None:
        self.diagnostics.append(Diagnostic("warning", message, span, notes))

    # includes ------------------------------------------------------------------------------

    def load(self, path: Path, stack: tuple[Path, ...]) -> list[ast.Statement]:
        """Parse `path` and splice in the statements of the files it includes."""
        document = parse_file(path)
        self.sources[str(path)] = document.source
        statements: list[ast.Statement] = []
        errors: list[Diagnostic] = []
        for statement in document.statements:
            if not isinstance(statement, ast.Include):
                statements.append(statement)
                continue
            target = (path.parent / statement.path.value).resolve()
            if target in stack or target == path.resolve():
                errors.append(Diagnostic("error", f"include cycle: {statement.path.value} includes itself", statement.path.span))
            elif not target.is_file():
                errors.append(Diagnostic("error", f"included file not found: {statement.path.value}", statement.path.span))
            else:
                try:
                    statements.extend(self.load(target, stack + (path.resolve(),)))
                except PlanError as error:
                    errors.extend(error.diagnostics)
        if errors:
            raise PlanError(errors)
        return statements

    # the plan ------------------------------------------------------------------------------

    def plan(self, statements: list[ast.Statement], path: Path) -> ir.Plan | None:
        models = [s for s in statements if isinstance(s, ast.ModelStmt)]
        for extra in models[1:]:
            self.error(f"a plan has one model; '{models[0].name}' is already declared at {models[0].span}", extra.name_span)
        model = self.model(models[0]) if models else None
        if not models:
            self.error("the plan declares no model: add `model NAME = factory(\"file.py:function\")` or `hf(\"dir\")`", Span(str(path), 1, 1, 1, 2))

        selectors: dict[str, ir.SelectDef] = {}
        for statement in statements:
            if isinstance(statement, ast.SelectStmt):
                if statement.name in selectors:
                    self.error(f"selector '{statement.name}' is already defined at {selectors[statement.name].span}", statement.name_span)
                    continue
                if statement.name == "all" or statement.name[0].isupper():
                    self.error(f"'{statement.name}' cannot name a selector: capitalized names and 'all' are built in", statement.name_span)
                    continue
                selector = self.selector(statement.selector, selectors)
                if selector is not None:
                    selectors[statement.name] = ir.SelectDef(span=statement.span, name=statement.name, selector=selector, optional=statement.optional)

        steps = [step for s in statements if isinstance(s, ast.PipelineStmt) for step in s.steps]
        pipeline = [p for p in (self.step(step, selectors) for step in steps) if p is not None]

        targets: dict[str, ir.Target] = {}
        seen: dict[str, Span] = {}
        for statement in statements:
            if isinstance(statement, ast.TargetStmt):
                if statement.kind in seen:
                    self.error(f"target '{statement.kind}' is already declared at {seen[statement.kind]}", statement.kind_span)
                    continue
                seen[statement.kind] = statement.span
                target = self.target(statement)
                if target is not None:
                    targets[statement.kind] = target
        if model is None:
            return None
        plan = ir.Plan(span=Span(str(path), 1, 1, 1, 1), model=model, selectors=selectors, pipeline=tuple(pipeline), targets=tuple(targets.values()))
        self.cross_checks(plan)
        return plan

    def model(self, statement: ast.ModelStmt) -> ir.ModelSource | None:
        call = statement.source
        base_dir = Path(call.span.file).parent
        if call.func not in MODEL_SOURCES:
            self.error(f"unknown model source '{call.func}'; expected factory(...) or hf(...)", call.func_span, did_you_mean(call.func, MODEL_SOURCES))
            return None
        positional = [arg for arg in call.args if arg.key is None]
        keywords = {arg.key: arg for arg in call.args if arg.key is not None}
        ref: str | None = None
        package: str | None = None
        if positional:
            if not isinstance(positional[0].value, ast.String):
                self.error(f"{call.func}(...) takes a quoted path as its first argument", positional[0].span)
                return None
            ref = positional[0].value.value
            for extra in positional[1:]:
                self.error("only the first argument may be positional; name the others (key = value)", extra.span)
        if call.func == "hf":
            if "package" in keywords:
                package_arg = keywords.pop("package")
                package = python_value(package_arg.value)
                ref = ref or "."
            for key, arg in keywords.items():
                self.error(f"unknown argument '{key}' for hf(...); expected a directory or package = \"name\"", arg.span)
            if ref is None:
                self.error('hf(...) needs a directory: hf("path/to/model") or hf(package = "name")', call.span)
                return None
            if package is None and not (base_dir / ref).is_dir():
                self.error(f"model directory not found: {ref}", positional[0].value.span)
        else:
            if ref is None or ":" not in ref:
                self.error('factory(...) needs "file.py:function" or "package.module:function"', call.span)
                return None
            module_part = ref.rsplit(":", 1)[0]
            if module_part.endswith(".py") and not (base_dir / module_part).is_file():
                self.error(f"factory file not found: {module_part}", positional[0].value.span)
        args = {key: python_value(arg.value) for key, arg in keywords.items()} if call.func == "factory" else {}

        task = "auto"
        inputs: list[ir.InputSpec] = []
        for entry in statement.body.entries if statement.body else ():
            if isinstance(entry, ast.Option) and entry.key == "task":
                task = python_value(entry.value)
                if task not in ("auto", "encoder", "causal_lm"):
                    self.error(f"task must be auto, encoder or causal_lm, not {task!r}", entry.value.span)
                    task = "auto"
            elif isinstance(entry, ast.SubBlock) and entry.key == "inputs":
                inputs.extend(self.inputs(entry.block))
            else:
                key = entry.name if isinstance(entry, ast.InputDecl) else entry.key
                self.error(f"unknown entry '{key}' in model block; expected task = ... or inputs {{ ... }}", entry.span, did_you_mean(key, ("task", "inputs")))
        if not inputs:
            inputs = self.default_inputs(call.func, statement.span)
        try:
            return ir.ModelSource(
                span=statement.span, name=statement.name, kind=call.func, ref=ref, package=package,
                args=args, task=task, inputs=tuple(inputs), base_dir=base_dir,
            )
        except ValidationError as error:  # pragma: no cover - every field is checked above
            self.error(str(error.errors()[0]["msg"]), statement.span)
            return None

    def inputs(self, block: ast.Block) -> list[ir.InputSpec]:
        specs = []
        dtypes = ("int64", "int32", "float32", "float16", "bool")
        for entry in block.entries:
            if not isinstance(entry, ast.InputDecl):
                self.error("expected an input declaration such as `input_ids: int64[batch, seq]`", entry.span)
                continue
            if entry.dtype not in dtypes:
                self.error(f"unknown dtype '{entry.dtype}'; expected one of {', '.join(dtypes)}", entry.dtype_span, did_you_mean(entry.dtype, dtypes))
                continue
            if any(spec.name == entry.name for spec in specs):
                self.error(f"input '{entry.name}' is declared twice", entry.span)
                continue
            specs.append(ir.InputSpec(span=entry.span, name=entry.name, dtype=entry.dtype, dims=entry.dims))
        return specs

    @staticmethod
    def default_inputs(kind: str, span: Span) -> list[ir.InputSpec]:
        names = ("input_ids", "attention_mask") if kind == "hf" else ("input_ids",)
        return [ir.InputSpec(span=span, name=name, dtype="int64", dims=("batch", "seq")) for name in names]

    # selectors -----------------------------------------------------------------------------

    def selector(self, expr: ast.SelExpr, known: dict[str, ir.SelectDef]) -> ir.Selector | None:
        if isinstance(expr, ast.SelBinary):
            left, right = self.selector(expr.left, known), self.selector(expr.right, known)
            if left is None or right is None:
                return None
            return ir.BinSel(span=expr.span, op=expr.op, left=left, right=right)
        if isinstance(expr, ast.SelName):
            if expr.name == "all":
                return ir.AllSel(span=expr.span)
            if expr.name[0].isupper():
                return ir.TypeSel(span=expr.span, type_name=expr.name)
            if expr.name not in known:
                self.error(f"unknown selector '{expr.name}'", expr.span, did_you_mean(expr.name, list(known)) or ("define it first with `select NAME = ...`; module types are capitalized (Linear)",))
                return None
            return ir.RefSel(span=expr.span, ref=expr.name)
        return self.selector_call(expr)

    def selector_call(self, call: ast.SelCall) -> ir.Selector | None:
        if call.func not in SELECTOR_FUNCTIONS:
            self.error(f"unknown selector function '{call.func}'", call.func_span, did_you_mean(call.func, SELECTOR_FUNCTIONS))
            return None
        if len(call.args) != 1:
            self.error(f"{call.func}(...) takes exactly one argument", call.span)
            return None
        arg = call.args[0]
        if call.func == "layers":
            if isinstance(arg, ast.Range) and isinstance(arg.first.value, int) and isinstance(arg.last.value, int):
                first, last = arg.first.value, arg.last.value
            elif isinstance(arg, ast.Number) and isinstance(arg.value, int):
                first = last = arg.value
            else:
                self.error("layers(...) takes a layer index or an inclusive range such as 0..2", arg.span)
                return None
            if first < 0 or last < first:
                self.error(f"empty layer range {first}..{last}", arg.span)
                return None
            return ir.LayerSel(span=call.span, first=first, last=last)
        if not isinstance(arg, ast.String):
            self.error(f'{call.func}(...) takes a quoted string, e.g. {call.func}("encoder.layer.*")', arg.span)
            return None
        if call.func == "regex":
            try:
                re.compile(arg.value)
            except re.error as error:
                self.error(f"invalid regular expression: {error}", arg.span)
                return None
            return ir.RegexSel(span=call.span, pattern=arg.value)
        if call.func == "type":
            return ir.TypeSel(span=call.span, type_name=arg.value)
        return ir.NameSel(span=call.span, pattern=arg.value)

    # pipeline steps and targets -------------------------------------------------------------

    def step(self, step: ast.Step, selectors: dict[str, ir.SelectDef]) -> ir.PassStep | None:
        options_model = pass_options().get(step.name)
        if options_model is None:
            self.error(f"unknown pass '{step.name}'", step.name_span, did_you_mean(step.name, list(pass_options())) or (f"passes: {', '.join(pass_options())}",))
            return None
        selector = self.selector(step.selector, selectors) if step.selector is not None else None
        options = _block_options(step.body, self.diagnostics) if step.body else _Options({}, {}, {})
        validated = _validate_options(options_model, options, f"pass '{step.name}'", step.name_span, self.diagnostics)
        if validated is None or (step.selector is not None and selector is None):
            return None
        spans = {".".join(map(str, loc)): span for loc, span in options.value_spans.items()}
        return ir.PassStep(span=step.span, selector=selector, options=validated, option_spans=spans)

    def target(self, statement: ast.TargetStmt) -> ir.Target | None:
        kind = target_kinds().get(statement.kind)
        if kind is None:
            known = sorted(target_kinds())
            self.error(f"unknown target '{statement.kind}'; expected {' or '.join(known)}", statement.kind_span, did_you_mean(statement.kind, known))
            return None
        model = kind.options
        options = _block_options(statement.body, self.diagnostics)
        validated = _validate_options(model, options, f"target '{statement.kind}'", statement.kind_span, self.diagnostics)
        if validated is None:
            return None
        spans = {".".join(map(str, loc)): span for loc, span in options.value_spans.items()}
        return ir.Target(span=statement.span, options=validated, option_spans=spans)

    # rules across statements ----------------------------------------------------------------

    def cross_checks(self, plan: ir.Plan) -> None:
        base = plan.model.base_dir
        self.rewrite_steps(plan)
        for step in plan.pipeline:
            calibration = getattr(step.options, "calibration", None)
            if calibration and calibration != STDLIB:
                self.require_file(base, calibration, step.option_spans.get("calibration", step.span))
        for target in plan.targets:
            self.diagnostics.extend(target_kinds()[target.kind].check(plan, target))
        if plan.target("train") is None:
            for step in plan.pipeline:
                if isinstance(step.options, Prune) and step.options.measures_activations:
                    option = "reconstruct" if step.options.reconstruct else "importance"
                    self.error(
                        f"{option} measures activations on the training text, which only the training program reads",
                        step.option_spans.get(option, step.span),
                        ("add a `target train` block (e.g. with distill), or use importance = l2 without reconstruct",),
                    )

    def rewrite_steps(self, plan: ir.Plan) -> None:
        """A pass that changes the architecture (share) rewrites the whole eager model before it
        is captured: it takes no selector and comes before every graph pass, as it runs."""
        graph_pass = None
        for step in plan.pipeline:
            if not step.options.rewrites_model:
                graph_pass = graph_pass or step
                continue
            if step.selector is not None:
                self.error(f"'{step.name}' rewrites every attention layer of the model: it takes no selector",
                           step.selector.span, ("a model has one key/value head count, e.g. `share { kv_heads = 2 }`",))
            if graph_pass is not None:
                self.error(f"'{step.name}' changes the model's architecture before it is captured, so it runs "
                           f"before every graph pass: move it above '{graph_pass.name}' (line {graph_pass.span.line})",
                           step.span)

    def require_file(self, base: Path, relative: str, span: Span) -> None:
        if not (base / relative).exists():
            self.error(f"file not found: {relative}", span)
