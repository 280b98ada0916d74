"""The installed layout: every folder of planc's source is a listed `planc.*` package."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_installed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        "planc." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("dsl", "compiler", "passes", "backends")
        for init in (ROOT / top).rglob("__init__.py")
        if init.parent != ROOT / "compiler" / "api"
    }
    assert set(setuptools["packages"]) == folders | {"planc"}


def test_planc_is_the_only_top_level_name() -> None:
    """Run outside the repository, where only the installed packages are visible."""
    code = (
        "import importlib.util, planc, planc.compiler, planc.dsl, planc.passes, planc.backends; "
        "print(callable(planc.compile), [importlib.util.find_spec(n) is None for n in ('compiler', 'dsl', 'passes', 'backends')])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "examples")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "[True,", "True,", "True,", "True]"]
