"""An artifact's external-data file holds exactly the bytes its graph references, once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from planc.backends.onnx import int4_compute


def _referenced_bytes(path: Path) -> int:
    """Sum of the `length` entries of every external initializer (the graph's own account)."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        total += int(entries.get("length", 0))
    return total


def _model_with_external_weights(directory: Path) -> Path:
    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    path = directory / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    return path


def test_rewriting_compute_over_a_copied_artifact_does_not_append_a_second_copy(tmp_path):
    source = _model_with_external_weights(tmp_path)
    variant = tmp_path / "variant"
    shutil.copytree(tmp_path, variant, ignore=shutil.ignore_patterns("variant"))  # as a verify-both variant is made
    int4_compute.with_compute(source, variant / "model.onnx", "int8")
    data = variant / "model.onnx.data"
    assert _referenced_bytes(variant / "model.onnx") == 64 * 64 * 4
    assert data.stat().st_size == _referenced_bytes(variant / "model.onnx")
