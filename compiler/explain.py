"""`planc explain`: the resolved plan, every default filled in, printed in plan syntax.

The IR is turned back into a syntax tree and printed by the same formatter as `planc fmt`,
so the output is itself a valid plan that validates to the same IR (`plan.resolved` in every
artifact is this text).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from planc.compiler import ir
from planc.dsl import ast
from planc.dsl.format import format_document
from planc.dsl.source import Source, Span

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOWHERE = Span("<resolved>", 0, 0, 0, 0)


def explain(plan: ir.Plan) -> str:
    """The plan in canonical syntax with all defaults made explicit."""
    statements: list[ast.Statement] = [_model(plan.model)]
    statements += [ast.SelectStmt(d.name, d.optional, _selector(d.selector)) for d in plan.selectors.values()]
    if plan.pipeline:
        statements.append(ast.PipelineStmt(tuple(_step(step) for step in plan.pipeline)))
    statements += [ast.TargetStmt(t.kind, _block(t.options)) for t in plan.targets]
    return format_document(ast.Document(tuple(statements), Source("<resolved>", "")))


def target_notes(plan: ir.Plan) -> list[str]:
    """Comment lines on what the plan's defaults resolve to on this machine (the int8 format) and
    on what only a compile resolves (a `fallback` step's int4/int8 split)."""
    from planc.passes.cpu import host_cpu, int8_format
    from planc.passes.quantize import Quantize

    notes = []
    if any(isinstance(s.options, Quantize) and s.options.fallback for s in plan.pipeline):
        notes.append("# fallback = int8: which layers stay int4 is searched against the verify goal when the plan")
        notes.append("#   compiles; `planc explain --passes` runs the search and prints the plan it resolves to")
    if not any(isinstance(s.options, Quantize) and (s.options.scheme == "int8" or s.options.fallback) for s in plan.pipeline):
        return notes
    onnx = plan.target("onnx")
    requested = onnx.options.cpu if onnx is not None else "auto"
    fmt = int8_format(requested)
    where = f"auto = {fmt.cpu} (this machine)" if requested == "auto" else f"{fmt.cpu} (this machine is {host_cpu()})"
    return notes + [f"# cpu {where}: int8 steps store {fmt.label}", f"#   because {fmt.why}"]


def value_node(value: Any) -> ast.Value:
    """A Python option value as plan syntax: True -> true, 'cpu' -> cpu, 0.5 -> 0.5."""
    if isinstance(value, bool):
        return ast.Ident("true" if value else "false", _NOWHERE)
    if isinstance(value, (int, float)):
        return ast.Number(repr(value), _NOWHERE)
    if isinstance(value, str):
        is_word = _NAME.match(value) and value not in ("true", "false", "none")
        return ast.Ident(value, _NOWHERE) if is_word else ast.String(value, _NOWHERE)
    if isinstance(value, (list, tuple)):
        return ast.ListValue(tuple(value_node(item) for item in value), _NOWHERE)
    raise TypeError(f"cannot print {value!r} in plan syntax")


def _block(options: BaseModel | dict) -> ast.Block:
    data = options.model_dump() if isinstance(options, BaseModel) else options
    # options whose `none` differs from leaving them out (`goal = none`: publish unverified)
    explicit = options.model_fields_set & getattr(options, "none_is_a_value", frozenset()) if isinstance(options, BaseModel) else set()
    entries: list[ast.Entry] = []
    for key, value in data.items():
        if value is None:
            if key in explicit:
                entries.append(ast.Option(key, ast.Ident("none", _NOWHERE), _NOWHERE, _NOWHERE))
            continue  # unset optional options are simply absent
        if isinstance(value, dict):
            nested = getattr(options, key, value) if isinstance(options, BaseModel) else value
            entries.append(ast.SubBlock(key, _block(nested if isinstance(nested, (BaseModel, dict)) else value), _NOWHERE, _NOWHERE))
        else:
            entries.append(ast.Option(key, value_node(value), _NOWHERE, _NOWHERE))
    return ast.Block(tuple(entries), _NOWHERE)


def _model(model: ir.ModelSource) -> ast.ModelStmt:
    args: list[ast.Arg] = [ast.Arg(None, ast.String(model.ref, _NOWHERE))]
    if model.kind == "hf" and model.package:
        args = [ast.Arg("package", ast.String(model.package, _NOWHERE))]
    args += [ast.Arg(key, value_node(value)) for key, value in model.args.items()]
    inputs = ast.Block(tuple(ast.InputDecl(i.name, i.dtype, i.dims) for i in model.inputs))
    body = ast.Block((ast.Option("task", ast.Ident(model.task, _NOWHERE)), ast.SubBlock("inputs", inputs)))
    return ast.ModelStmt(model.name, ast.Call(model.kind, tuple(args)), body)


def _step(step: ir.PassStep) -> ast.Step:
    selector = _selector(step.selector) if step.selector is not None else None
    return ast.Step(step.name, selector, _block(step.options))


def _selector(selector: ir.Selector) -> ast.SelExpr:
    if isinstance(selector, ir.BinSel):
        return ast.SelBinary(selector.op, _selector(selector.left), _selector(selector.right))
    if isinstance(selector, ir.TypeSel):
        if _NAME.match(selector.type_name) and selector.type_name[0].isupper():
            return ast.SelName(selector.type_name)
        return ast.SelCall("type", (ast.String(selector.type_name, _NOWHERE),))
    if isinstance(selector, ir.RefSel):
        return ast.SelName(selector.ref)
    if isinstance(selector, ir.AllSel):
        return ast.SelName("all")
    if isinstance(selector, ir.LayerSel):
        first, last = ast.Number(str(selector.first), _NOWHERE), ast.Number(str(selector.last), _NOWHERE)
        return ast.SelCall("layers", (ast.Range(first, last, _NOWHERE),))
    func = "regex" if isinstance(selector, ir.RegexSel) else "name"
    return ast.SelCall(func, (ast.String(selector.pattern, _NOWHERE),))
