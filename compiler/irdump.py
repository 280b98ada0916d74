"""A stable, readable dump of the plan IR with the line:col of every node (`--emit ir`).

Golden tests compare this text, so it prints fields in declaration order, one per line, and
omits nothing but spans of the file name (which differ between machines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from planc.compiler import ir


def dump_ir(plan: ir.Plan) -> str:
    lines: list[str] = []
    _dump(plan, 0, lines, label="plan", home=plan.span.file)
    return "\n".join(lines) + "\n"


def _position(node: ir.Node, home: str) -> str:
    """`@line:col`, prefixed by the file's name when the node came from an included file."""
    span = node.span
    if not span.line:
        return ""
    where = "" if span.file == home else f"{Path(span.file).name}:"
    return f"@{where}{span.line}:{span.col}"


def _dump(value: Any, depth: int, lines: list[str], label: str, home: str) -> None:
    pad = "  " * depth
    if isinstance(value, ir.Node):
        kind = type(value).__name__
        lines.append(f"{pad}{label}: {kind} {_position(value, home)}".rstrip())
        for name in type(value).model_fields:
            if name in ("span", "option_spans", "base_dir"):
                continue
            _dump(getattr(value, name), depth + 1, lines, name, home)
    elif isinstance(value, BaseModel):  # pass or target options: name them, then their fields
        title = getattr(value, "name", None) or getattr(value, "kind", None) or type(value).__name__
        lines.append(f"{pad}{label}: {title}")
        for name in type(value).model_fields:
            _dump(getattr(value, name), depth + 1, lines, name, home)
    elif isinstance(value, dict) and value and all(isinstance(v, (ir.Node, BaseModel)) for v in value.values()):
        lines.append(f"{pad}{label}:")
        for key, item in value.items():
            _dump(item, depth + 1, lines, key, home)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, (ir.Node, BaseModel)) for v in value):
        lines.append(f"{pad}{label}:")
        for index, item in enumerate(value):
            _dump(item, depth + 1, lines, f"[{index}]", home)
    else:
        shown = str(value) if isinstance(value, Path) else repr(value)
        lines.append(f"{pad}{label}: {shown}")
