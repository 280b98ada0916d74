"""Compare text against a golden file; `UPDATE_GOLDEN=1` rewrites the expectation instead."""

from __future__ import annotations

import os
from pathlib import Path


def check_golden(actual: str, golden: Path) -> None:
    if os.environ.get("UPDATE_GOLDEN") == "1" or not golden.exists():
        if os.environ.get("UPDATE_GOLDEN") != "1":
            raise AssertionError(f"missing golden file {golden}; run with UPDATE_GOLDEN=1 to create it")
        golden.write_text(actual, encoding="utf-8")
        return
    expected = golden.read_text(encoding="utf-8")
    assert actual == expected, f"{golden.name} differs (UPDATE_GOLDEN=1 to accept):\n{actual}"
