"""Execution providers, session settings and dtype support of the ONNX Runtime layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from planc.backends.onnx import runtime
from planc.backends.onnx.runtime import ProviderError


def test_auto_is_cuda_only_when_available():
    assert runtime.resolve_providers(["auto"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.resolve_providers(["auto"], both) == both
    assert runtime.resolve_providers(["cpu"], both) == ["CPUExecutionProvider"]


def test_auto_on_this_machine_uses_available_providers_only():
    resolved = runtime.resolve_providers(["auto"])
    assert set(resolved) <= set(runtime.available_providers())
    assert resolved[-1] == "CPUExecutionProvider"


def test_missing_provider_is_a_clear_error():
    with pytest.raises(ProviderError, match="'cuda'.*not available.*providers = \\[auto\\]"):
        runtime.resolve_providers(["cuda"], ["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="tensorrt"):
        runtime.resolve_providers(["tensorrt", "cpu"], ["CPUExecutionProvider"])


def test_bf16_on_cpu_is_refused_fp16_is_not():
    with pytest.raises(ProviderError, match="bf16 is not supported.*CPU"):
        runtime.check_dtypes({"FLOAT", "BFLOAT16"}, ["CPUExecutionProvider"])
    runtime.check_dtypes({"FLOAT", "FLOAT16"}, ["CPUExecutionProvider"])
    runtime.check_dtypes({"BFLOAT16"}, ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _tiny_model(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    return path


def test_sessions_never_spin_and_use_the_plan_threads(tmp_path):
    session = runtime.create_session(_tiny_model(tmp_path), ["CPUExecutionProvider"], threads=3, level="basic")
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 3
    assert runtime.run(session, {"x": np.array([-1.0, 2.0], np.float32)})["y"].tolist() == [0.0, 2.0]


def test_optimized_model_is_saved(tmp_path):
    out = tmp_path / "opt.onnx"
    runtime.create_session(_tiny_model(tmp_path), ["CPUExecutionProvider"], 1, "extended", optimized_path=out)
    assert onnx.load(str(out)).graph.node[0].op_type == "Relu"


def test_fp16_graph_runs_on_the_cpu_provider(gpt, tmp_path):
    """The cast pass's fp16 graph exports and runs on CPU, close to the fp32 model."""
    from onnx_helpers import run_passes

    from planc.backends.onnx.export import export_model, save_model
    from planc.backends.onnx.optimize import optimize_graph
    from planc.passes.cast import Cast

    loaded, gm = gpt
    half, _ = run_passes(loaded, gm, (Cast(dtype="fp16"), frozenset()))
    model = export_model(half, loaded.example_inputs, loaded.dynamic_shapes)
    optimize_graph(model, fusions=True)
    path = tmp_path / "fp16.onnx"
    save_model(model, path)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in onnx.load(str(path)).graph.initializer)
    session = runtime.create_session(path, runtime.resolve_providers(["cpu"]), threads=1)
    got = next(iter(runtime.run(session, loaded.example_inputs).values()))
    with torch.no_grad():
        want = loaded.model(**loaded.example_inputs)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    mask = loaded.example_inputs["attention_mask"].bool().numpy()
    np.testing.assert_allclose(got[mask], want[mask], atol=0.05 * np.abs(want).max())
