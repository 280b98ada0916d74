"""The torch API that emitted training programs call, found by reading their source, and its
check against the API of an older torch (the GPU machine's 2.11) recorded once.

`planc_runtime/` and the generated `train.py` run on whatever torch the training machine has.
This module finds every `torch.*` name they use (through `import torch.distributed as dist`,
`from torch.distributed.fsdp import fully_shard`, ...) and the keywords each call passes;
`record` resolves those names in the running torch (run it under the old torch), and `problems`
reports uses the record does not cover. A use inside `try: ... except (ImportError,
AttributeError, TypeError)` or under `if hasattr(...)` is a guarded one: it has a fallback.
Standard library only, so the old torch's Python runs it without planc.

    python bench/torch_api.py record --out tests/train/torch_2_11_api.json   # under torch 2.11
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The helpers copied next to every train.py, and generated programs of every strategy.
SOURCES = (REPO / "backends" / "train" / "planc_runtime", REPO / "tests" / "golden" / "train")
#: Exceptions whose handler makes a `try` body a guarded use.
GUARDS = {"ImportError", "ModuleNotFoundError", "AttributeError", "TypeError"}


@dataclass(frozen=True)
class Use:
    """One use of a torch name: where, with which call keywords, and whether it has a fallback."""

    name: str
    where: str
    keywords: tuple[str, ...] = ()
    guarded: bool = False


@dataclass
class _Scope:
    aliases: dict[str, str] = field(default_factory=dict)


def source_files(paths: tuple[Path, ...] = SOURCES) -> list[Path]:
    """Python files under `paths`: *.py, and generated programs kept as *.train.py.txt."""
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        else:
            files += sorted(path.rglob("*.py")) + sorted(path.rglob("*.train.py.txt"))
    return files


def _dotted(node: ast.AST) -> list[str] | None:
    """['dist', 'all_reduce'] for `dist.all_reduce`; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _catches_guard(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in GUARDS | {"Exception"} for t in types)


def _tests_hasattr(test: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
               for n in ast.walk(test))


class _Finder(ast.NodeVisitor):
    """Collects torch uses; one alias table for the module (programs import at the top or
    locally, always under the same names)."""

    def __init__(self, where: str):
        self.where, self.aliases, self.uses, self._guards = where, {}, [], 0

    def _use(self, name: str, node: ast.AST, keywords: tuple[str, ...] = ()) -> None:
        self.uses.append(Use(name, f"{self.where}:{node.lineno}", keywords, self._guards > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "torch":
                self.aliases[alias.asname or "torch"] = alias.name if alias.asname else "torch"
                self._use(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                self.aliases[alias.asname or alias.name] = name
                self._use(name, node)

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_guard(h) for h in node.handlers)
        self._guards += guarded
        for statement in node.body:
            self.visit(statement)
        self._guards -= guarded
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    def visit_If(self, node: ast.If) -> None:
        guarded = _tests_hasattr(node.test)
        self.visit(node.test)
        self._guards += guarded
        for statement in node.body:
            self.visit(statement)
        self._guards -= guarded
        for statement in node.orelse:
            self.visit(statement)

    def _resolve(self, node: ast.AST) -> str | None:
        parts = _dotted(node)
        if parts is None or parts[0] not in self.aliases:
            return None
        return ".".join([self.aliases[parts[0]], *parts[1:]])

    def visit_Call(self, node: ast.Call) -> None:
        name = self._resolve(node.func)
        if name is not None:
            self._use(name, node, tuple(k.arg for k in node.keywords if k.arg))
            for arg in (*node.args, *node.keywords):
                self.visit(arg)
            return
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = self._resolve(node)
        if name is not None:
            self._use(name, node)
            return
        self.generic_visit(node)


def scan_source(source: str, where: str) -> list[Use]:
    """Every torch use in one file's source."""
    finder = _Finder(where)
    finder.visit(ast.parse(source))
    return finder.uses


def scan(paths: tuple[Path, ...] = SOURCES) -> list[Use]:
    uses = []
    for path in source_files(paths):
        where = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
        uses += scan_source(path.read_text(encoding="utf-8"), where)
    return uses


def _lookup(name: str) -> object:
    """The object a dotted torch name denotes: the longest importable module, then attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _parameters(obj: object) -> dict:
    """Keyword-passable parameter names of a callable (a class: its constructor), or "any"."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature
        return {"parameters": "any"}
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return {"parameters": "any"}
    return {"parameters": sorted(n for n, p in signature.parameters.items()
                                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))}


def record(uses: list[Use]) -> dict:
    """The running torch's answer for every used name: its keyword parameters, or missing."""
    import torch

    names, missing = {}, []
    for name in sorted({u.name for u in uses}):
        try:
            obj = _lookup(name)
        except (ImportError, AttributeError):
            missing.append(name)
            continue
        names[name] = _parameters(obj) if callable(obj) and not inspect.ismodule(obj) else {}
    return {"torch": torch.__version__, "names": names, "missing": missing}


def problems(uses: list[Use], surface: dict) -> list[str]:
    """Unguarded uses the recorded torch cannot serve: an unknown or missing name, or a call
    keyword its signature lacks."""
    found, version = [], ".".join(surface["torch"].split(".")[:2])  # "2.11.0+cu130" -> "2.11"
    for use in uses:
        if use.guarded:
            continue
        if use.name in surface["missing"]:
            found.append(f"{use.where}: torch {version} has no {use.name}; guard it with a fallback")
        elif use.name not in surface["names"]:
            found.append(f"{use.where}: {use.name} is not in the recorded torch {version} API: record it "
                         f"(bench/torch_api.py record, under torch {version}) or guard it with a fallback")
        else:
            parameters = surface["names"][use.name].get("parameters", "any")
            unknown = [k for k in use.keywords if parameters != "any" and k not in parameters]
            if unknown:
                found.append(f"{use.where}: {use.name} takes no keyword {', '.join(unknown)} in torch {version}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="resolve every used torch name in this Python's torch")
    rec.add_argument("--out", type=Path, required=True)
    sub.add_parser("check", help="check the uses against a recorded API").add_argument("surface", type=Path)
    args = parser.parse_args()
    uses = scan()
    if args.command == "record":
        surface = record(uses)
        args.out.write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")
        print(f"torch {surface['torch']}: {len(surface['names'])} names, missing {surface['missing']}")
    else:
        found = problems(uses, json.loads(args.surface.read_text()))
        print("\n".join(found) or f"{len(uses)} uses, all served")
        raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
