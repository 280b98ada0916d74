"""The modules the training runtime shares with planc (structure, ranks, model_source, gqa) are
planc's own files: emit copies them in (`backends/train/shared_modules.py`; the emitted
copies are checked in `test_emit.py`), and in planc's tree the runtime imports planc's. So there
is one analysis of heads and channels, one rank rule, one way to find and rebuild the model and
one grouped-query rewrite, and each must run where planc is not installed."""

from __future__ import annotations

import ast
import importlib

import pytest

from planc.backends.train.shared_modules import SHARED_MODULES, shared_module_file


@pytest.mark.parametrize("name", SHARED_MODULES)
def test_the_runtime_in_plancs_tree_uses_plancs_module(name: str) -> None:
    from planc.backends.train import planc_runtime

    runtime = importlib.import_module(f"{planc_runtime.__name__}.{name}")
    assert runtime is importlib.import_module(SHARED_MODULES[name])


@pytest.mark.parametrize("name", SHARED_MODULES)
def test_shared_modules_import_only_torch_and_the_standard_library(name: str) -> None:
    allowed = {"torch", "__future__", "operator", "collections", "dataclasses", "typing", "functools",
               "hashlib", "importlib", "json", "os", "re", "sys", "pathlib", "transformers"}
    for node in ast.walk(ast.parse(shared_module_file(SHARED_MODULES[name]).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name} must not use relative imports (it lives in two packages)"
            names = [node.module or ""]
        for imported in names:
            assert imported.split(".")[0] in allowed, f"{name} imports {imported}: the training runtime cannot"
