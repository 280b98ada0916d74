"""The modules the training runtime shares with planc, and where planc keeps them.

They import only torch and the standard library. Emit copies planc's own files into each
program's runtime (`cache.runtime_sources`); in planc's tree the runtime imports planc's
(`planc_runtime/__init__.py`). So the compiler and the training program run one analysis of
heads and channels, one rank rule, one model source and one grouped-query rewrite.

Standard library only; the runtime imports this module, so it imports no part of the runtime.
"""

from __future__ import annotations

from pathlib import Path

#: {name in the runtime: planc's module}.
SHARED_MODULES = {"structure": "planc.passes.structure", "ranks": "planc.passes.ranks",
                  "model_source": "planc.compiler.model_source", "gqa": "planc.passes.share.gqa"}
#: Where planc's folders are (the repository, or the installed `planc` package).
_PLANC_ROOT = Path(__file__).resolve().parents[2]


def shared_module_file(module: str) -> Path:
    """The file of one of planc's modules named in `SHARED_MODULES`."""
    return _PLANC_ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
