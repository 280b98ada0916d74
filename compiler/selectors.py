"""Resolve plan selectors against a model's module table: (dotted path, class name) pairs.

Torch-free on purpose: the model source (`compiler.model`) lists the modules, this module only matches names, so the
rules can be tested on plain lists.

- `Linear` matches modules of that class name;
- `name("glob")` matches paths with shell-style wildcards (`*` also crosses dots);
- `regex("...")` must match the whole path;
- `layers(a..b)` matches every module inside repeated blocks a..b — the block index is the first
  integer component of a path, as in `encoder.layer.3.attention` or `blocks.3.mlp`;
- `all` matches every module; `|`, `&`, `-` are union, intersection and difference.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from planc.compiler import ir
from planc.dsl.source import Diagnostic


def layer_index(path: str) -> int | None:
    """The index of the repeated block a module lives in, if any."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def resolve(selector: ir.Selector, table: list[tuple[str, str]], defs: dict[str, ir.SelectDef]) -> set[str]:
    """The set of module paths `selector` matches."""
    if isinstance(selector, ir.BinSel):
        left = resolve(selector.left, table, defs)
        right = resolve(selector.right, table, defs)
        return left | right if selector.op == "|" else left & right if selector.op == "&" else left - right
    if isinstance(selector, ir.RefSel):
        return resolve(defs[selector.ref].selector, table, defs)
    if isinstance(selector, ir.AllSel):
        return {path for path, _ in table}
    if isinstance(selector, ir.TypeSel):
        return {path for path, kind in table if kind == selector.type_name}
    if isinstance(selector, ir.NameSel):
        return {path for path, _ in table if fnmatchcase(path, selector.pattern)}
    if isinstance(selector, ir.RegexSel):
        pattern = re.compile(selector.pattern)
        return {path for path, _ in table if pattern.fullmatch(path)}
    assert isinstance(selector, ir.LayerSel)
    return {
        path
        for path, _ in table
        if (index := layer_index(path)) is not None and selector.first <= index <= selector.last
    }


def step_targets(step: ir.PassStep, table: list[tuple[str, str]], plan: ir.Plan) -> tuple[set[str], list[Diagnostic]]:
    """Module paths a pipeline step acts on, with an error (or warning) if that is nothing."""
    diagnostics: list[Diagnostic] = []
    if step.selector is None:
        types = step.options.default_types
        targets = {path for path, kind in table if kind in types} if types else {path for path, _ in table}
        if not targets:
            diagnostics.append(Diagnostic("error", f"pass '{step.name}' found no {' or '.join(types)} module in the model", step.span))
        return targets, diagnostics
    targets = resolve(step.selector, table, plan.selectors)
    if not targets:
        optional = isinstance(step.selector, ir.RefSel) and plan.selectors[step.selector.ref].optional
        kinds = sorted({kind for _, kind in table})
        notes = [f"module types in this model: {', '.join(kinds[:12])}{', ...' if len(kinds) > 12 else ''}"]
        if isinstance(step.selector, ir.RefSel):
            notes.insert(0, f"'{step.selector.ref}' is defined at {plan.selectors[step.selector.ref].span}")
        diagnostics.append(
            Diagnostic(
                "warning" if optional else "error",
                f"selector matches no module of the model for pass '{step.name}'",
                step.selector.span,
                tuple(notes),
            )
        )
    return targets, diagnostics
