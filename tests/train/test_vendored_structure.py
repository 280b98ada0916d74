"""The training runtime's structure.py and ranks.py are planc's passes/structure.py and
passes/ranks.py, byte for byte: one analysis of heads and channels, and one rank rule, for the
compiler and the training program. Edit the original and copy it over
(`cp passes/structure.py passes/ranks.py backends/train/planc_runtime/`)."""

from __future__ import annotations

import ast

import pytest

from train_helpers import REPO

VENDORED = ("structure.py", "ranks.py")


@pytest.mark.parametrize("name", VENDORED)
def test_runtime_modules_are_copies_of_the_pass_modules(name: str) -> None:
    original, copy = REPO / "passes" / name, REPO / "backends" / "train" / "planc_runtime" / name
    assert copy.read_bytes() == original.read_bytes(), (
        f"backends/train/planc_runtime/{name} differs from passes/{name}: edit passes/{name}, "
        "then copy it over the runtime's"
    )


@pytest.mark.parametrize("name", VENDORED)
def test_vendored_modules_import_only_torch_and_the_standard_library(name: str) -> None:
    allowed = {"torch", "__future__", "operator", "collections", "dataclasses", "typing"}
    for node in ast.walk(ast.parse((REPO / "passes" / name).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name} must not use relative imports (it lives in two packages)"
            names = [node.module or ""]
        for imported in names:
            assert imported.split(".")[0] in allowed, f"{name} imports {imported}: the training runtime cannot"
