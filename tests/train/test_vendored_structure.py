"""The training runtime's structure.py, ranks.py, model_source.py and gqa.py are planc's own
modules, byte for byte: one analysis of heads and channels, one rank rule, one way to find and
rebuild the model, one grouped-query rewrite, for the compiler and the training program. Edit the
original and copy it over (`cp passes/structure.py passes/ranks.py compiler/model_source.py
passes/share/gqa.py backends/train/planc_runtime/`)."""

from __future__ import annotations

import ast

import pytest

from train_helpers import REPO

#: runtime module -> the original it copies
VENDORED = {"structure.py": "passes/structure.py", "ranks.py": "passes/ranks.py",
            "model_source.py": "compiler/model_source.py", "gqa.py": "passes/share/gqa.py"}


@pytest.mark.parametrize("name", VENDORED)
def test_runtime_modules_are_copies_of_planc_modules(name: str) -> None:
    original, copy = REPO / VENDORED[name], REPO / "backends" / "train" / "planc_runtime" / name
    assert copy.read_bytes() == original.read_bytes(), (
        f"backends/train/planc_runtime/{name} differs from {VENDORED[name]}: edit the original, "
        "then copy it over the runtime's"
    )


@pytest.mark.parametrize("name", VENDORED)
def test_vendored_modules_import_only_torch_and_the_standard_library(name: str) -> None:
    allowed = {"torch", "__future__", "operator", "collections", "dataclasses", "typing", "functools",
               "hashlib", "importlib", "json", "os", "re", "sys", "pathlib", "transformers"}
    for node in ast.walk(ast.parse((REPO / VENDORED[name]).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name} must not use relative imports (it lives in two packages)"
            names = [node.module or ""]
        for imported in names:
            assert imported.split(".")[0] in allowed, f"{name} imports {imported}: the training runtime cannot"
