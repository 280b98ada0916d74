"""The training runtime's structure.py is planc's passes/structure.py, byte for byte: one
analysis of heads and channels for the compiler and the training program. Edit the original
and copy it over (`cp passes/structure.py backends/train/planc_runtime/structure.py`)."""

from __future__ import annotations

import ast

from train_helpers import REPO

ORIGINAL = REPO / "passes" / "structure.py"
COPY = REPO / "backends" / "train" / "planc_runtime" / "structure.py"


def test_runtime_structure_is_a_copy_of_the_pass_module() -> None:
    assert COPY.read_bytes() == ORIGINAL.read_bytes(), (
        "backends/train/planc_runtime/structure.py differs from passes/structure.py: edit passes/structure.py, "
        "then copy it over the runtime's"
    )


def test_structure_imports_only_torch_and_the_standard_library() -> None:
    allowed = {"torch", "__future__", "operator", "collections", "dataclasses", "typing"}
    for node in ast.walk(ast.parse(ORIGINAL.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "structure.py must not use relative imports (it lives in two packages)"
            names = [node.module or ""]
        for name in names:
            assert name.split(".")[0] in allowed, f"structure.py imports {name}: the training runtime cannot"
