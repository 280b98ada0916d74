"""The one publishing helper: a reader sees the old version or the new, never half."""

from __future__ import annotations

from pathlib import Path

import pytest

from planc.compiler.publish import staged_dir, write_text


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_failed_publish_keeps_the_old_directory(tmp_path):
    out = tmp_path / "artifact"
    with staged_dir(out) as stage:
        (stage / "model.onnx").write_text("v1")
    with pytest.raises(RuntimeError, match="goal missed"):
        with staged_dir(out) as stage:
            (stage / "model.onnx").write_text("v2, half")
            raise RuntimeError("goal missed")
    assert (out / "model.onnx").read_text() == "v1"
    assert _leftovers(tmp_path) == []


def test_kept_entries_move_into_the_new_directory(tmp_path):
    out = tmp_path / "program"
    with staged_dir(out) as stage:
        (stage / "train.py").write_text("old")
        (stage / "checkpoints").mkdir()
        (stage / "checkpoints" / "step_10.pt").write_text("state")
    with staged_dir(out, keep=["checkpoints"]) as stage:
        (stage / "train.py").write_text("new")
    assert (out / "train.py").read_text() == "new"
    assert (out / "checkpoints" / "step_10.pt").read_text() == "state"
    assert _leftovers(tmp_path) == []


def test_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "a.plan"
    path.write_text("old")
    write_text(path, "new\n")
    assert path.read_text() == "new\n" and _leftovers(tmp_path) == []
