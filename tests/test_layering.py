"""The import layering the README documents, read from the source (every import, local ones too).

    dsl  <-  compiler.ir, compiler.model, compiler.targets  <-  passes  <-  backends  <-  compiler.driver  <-  compiler.cli, planc

An arrow points at what may be imported. The emitted training runtime imports only torch, the
standard library and optional helpers, so `train.py` runs without planc installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLANC = ("dsl", "compiler", "passes", "backends")
#: Modules of `compiler` that lower layers may import: the IR and the one model source (and
#: what they are made of), the target protocol, the publishing helper, the CPU-neutral explainer, the byte vocabulary,
#: the memory model (standard library only: checkpoint headers, which builds stream, the fusion probe's size limit).
COMPILER_BASE = ("compiler.ir", "compiler.model", "compiler.model_source", "compiler.targets", "compiler.publish", "compiler.explain",
                 "compiler.textdata", "compiler.selectors", "compiler.byte_vocab", "compiler.footprint")
MAX_LINES = 600


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code, as written (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.removeprefix("planc.") not in PLANC:  # `from planc.compiler import ir` imports ir, named below
                found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path) -> set[str]:
    """`imported_names` with planc's own modules named by their folder (`compiler.ir`)."""
    return {name.removeprefix("planc.") for name in imported_names(path)}


def _planc(imported: set[str]) -> set[str]:
    return {name for name in imported if name.split(".")[0] in (*PLANC, "planc")}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_option_model(name: str) -> bool:
    """`passes.options` or a pass package's option model (`passes.prune.Prune`), never an implementation."""
    parts = name.split(".")
    if parts[:2] == ["passes", "options"]:
        return True
    is_package = len(parts) >= 2 and (ROOT / "passes" / parts[1] / "__init__.py").exists()
    return is_package and (len(parts) == 2 or (len(parts) == 3 and parts[2][:1].isupper()))


RUNTIME = ROOT / "backends" / "train" / "planc_runtime"
SOURCES = [p for p in python_files(*PLANC) if RUNTIME not in p.parents and p != RUNTIME.with_suffix(".py")]


@pytest.mark.parametrize("path", SOURCES, ids=[module_of(p) for p in SOURCES])
def test_imports_point_down(path: Path) -> None:
    module = module_of(path)
    imported = _planc(imports_of(path))
    if module.startswith("dsl"):
        assert not {n for n in imported if not n.startswith("dsl")}, "dsl imports only dsl"
        assert not {n for n in imports_of(path) if n.split(".")[0] == "torch"}, "dsl never loads torch"
    elif _within(module, COMPILER_BASE):
        wrong = {n for n in imported if n.startswith(("passes.", "compiler.driver", "compiler.cli")) and not _is_option_model(n)}
        assert not wrong or module == "compiler.explain", f"{module} is a base layer: {sorted(wrong)}"
    elif module.startswith("passes"):
        wrong = {n for n in imported if n.startswith(("backends", "compiler")) and not _within(n, COMPILER_BASE)}
        assert not wrong, f"passes import only dsl, the IR and the model source: {sorted(wrong)}"
    elif module.startswith("backends"):
        wrong = {n for n in imported if n.startswith("compiler") and not _within(n, COMPILER_BASE)}
        assert not wrong, f"backends never import the driver or CLI: {sorted(wrong)}"
        private = {n for n in imported if n.startswith("compiler.model.") and not n.startswith("compiler.model.load_hf")}
        assert not {n for n in private if n.split(".")[2] in ("load", "capture", "outputs", "common", "tokenizers")}, (
            f"backends use compiler.model's public API, not its modules: {sorted(private)}")
    if module.startswith("compiler") and not _within(module, ("compiler.cli", "compiler.driver", "compiler.api", "compiler.targets")):
        wrong = {n for n in imported if n.startswith("backends")}
        assert not wrong, f"{module}: only the CLI, the driver's API and target discovery import backends: {sorted(wrong)}"
    if module not in ("compiler.cli", "compiler.api") and not module.startswith("compiler.cli"):
        assert not {n for n in imported if _within(n, ("compiler.cli",))}, "nothing imports the CLI"
    if not module.startswith(("compiler.cli", "compiler.driver")) and module != "compiler.api":
        assert not {n for n in imported if _within(n, ("compiler.driver",))}, "only the CLI and the API import the driver"


@pytest.mark.parametrize("path", SOURCES, ids=[module_of(p) for p in SOURCES])
def test_planc_imports_itself_by_its_installed_name(path: Path) -> None:
    """`import compiler` would find a user's own `compiler` package, or nothing, once installed."""
    bare = {name for name in imported_names(path) if name.split(".")[0] in PLANC}
    assert not bare, f"import these as planc.*: {sorted(bare)}"


def test_the_training_runtime_imports_no_planc() -> None:
    """An emitted program runs without planc. The one exception is the package's `__init__` in
    planc's own tree, where the modules emit copies in are absent: it imports planc's."""
    runtime = python_files("backends/train/planc_runtime") or [RUNTIME.with_suffix(".py")]
    for path in runtime:
        in_tree = {"backends.train.shared_modules", "backends.train.shared_modules.SHARED_MODULES"}
        allowed = in_tree if path == RUNTIME / "__init__.py" else set()
        assert not _planc(imports_of(path)) - allowed, f"{path.name} must run without planc installed"


@pytest.mark.parametrize("path", python_files(*PLANC), ids=[module_of(p) for p in python_files(*PLANC)])
def test_no_module_is_too_long_to_read(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concern"
