"""`planc::linear_clustered` -> ONNX: the file keeps indices + codebooks, ORT computes the planc op,
and the artifact reports what ONNX Runtime keeps in memory after loading it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from onnx_helpers import SENTENCES, gpt_source, linear_paths, run_passes
from planc.backends.onnx import runtime
from planc.backends.onnx.artifact import build_onnx_artifact, run_artifact
from planc.backends.onnx.cluster_lowering import SAVE_DISABLED_OPTIMIZERS, embedding_scheme, load_expansion
from planc.backends.onnx.export import export_model, save_model
from planc.backends.onnx.optimize import optimize_graph
from planc.backends.onnx.options import OnnxTarget
from planc.passes.cluster import Cluster
from planc.passes.cluster.kmeans import kmeans_rows
from planc.passes.cluster.ops import pack_indices

DIMS = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
CPU = ["CPUExecutionProvider"]
#: Rows of the test weights: enough that the exporter's constant folder (which folds nodes whose
#: inputs hold at most 8192 elements) leaves the packed indices alone.
N_OUT = 192


class Clustered(torch.nn.Module):
    def __init__(self, w: torch.Tensor, bits: int, per_tensor: bool, bias: bool) -> None:
        super().__init__()
        clusters = kmeans_rows(w.reshape(1, -1) if per_tensor else w, 2**bits)
        self.register_buffer("indices", pack_indices(clusters.indices.reshape(w.shape), bits))
        self.register_buffer("codebook", clusters.codebook)
        self.register_buffer("bias", torch.randn(w.shape[0]) if bias else None)
        self.in_features, self.bits = w.shape[1], bits

    def forward(self, x):
        return torch.ops.planc.linear_clustered(x, self.indices, self.codebook, self.in_features, self.bits, self.bias)


def _export(module: torch.nn.Module, x: torch.Tensor, path):
    model = export_model(module, {"x": x}, DIMS)
    optimize_graph(model, fusions=False)
    save_model(model, path)
    return onnx.load(str(path))


@pytest.mark.parametrize(
    "bits, per_tensor, n_in, bias",
    [(4, False, 131, True), (3, False, 130, False), (8, True, 130, True), (2, True, 200, True), (1, False, 401, False)],
)
def test_exported_file_keeps_indices_and_codebooks_and_computes_the_op(bits, per_tensor, n_in, bias, tmp_path):
    torch.manual_seed(bits)
    module = Clustered(torch.randn(N_OUT, n_in) * 0.05, bits, per_tensor, bias)
    x = torch.randn(2, 5, n_in)
    proto = _export(module, x, tmp_path / "m.onnx")
    shapes = {(i.data_type, tuple(i.dims)) for i in proto.graph.initializer}
    # The packed indices, as they are or (8-bit: nothing to unpack) transposed by the exporter.
    assert any(t == onnx.TensorProto.UINT8 and sorted(d) == sorted(module.indices.shape) for t, d in shapes)
    assert not any(t == onnx.TensorProto.FLOAT and sorted(d) == sorted((N_OUT, n_in)) for t, d in shapes)
    want = module(x).numpy()
    for level in ("disabled", "all"):  # the lookups run, or ORT folds them at load: same values
        session = runtime.create_session(tmp_path / "m.onnx", CPU, threads=1, level=level)
        got = next(iter(runtime.run(session, {"x": x}).values()))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_saved_graph_stays_compact_and_the_load_is_measured(tmp_path):
    torch.manual_seed(0)
    module = Clustered(torch.randn(N_OUT, 256) * 0.05, 4, per_tensor=False, bias=True)
    x = torch.randn(1, 3, 256)
    _export(module, x, tmp_path / "raw.onnx")
    runtime.create_session(tmp_path / "raw.onnx", CPU, 1, "extended", optimized_path=tmp_path / "saved.onnx",
                           disabled_optimizers=SAVE_DISABLED_OPTIMIZERS)
    saved = onnx.load(str(tmp_path / "saved.onnx"))
    assert [n.op_type for n in saved.graph.node].count("GatherElements") == 1
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) > 16 for i in saved.graph.initializer)
    measured = load_expansion(tmp_path / "saved.onnx", CPU, 1, "all", tmp_path)
    as_loaded = onnx.load(str(tmp_path / "as_loaded.onnx"))
    # The report says what the session's own graph holds, whatever ORT chose to do.
    assert measured["lookups_in_file"] == 1
    assert measured["lookups_after_load"] == [n.op_type for n in as_loaded.graph.node].count("GatherElements")
    assert measured["expanded_at_load"] == (measured["lookups_after_load"] == 0)
    if measured["expanded_at_load"]:
        assert measured["weight_bytes_after_load"] >= measured["weight_bytes_in_file"] + N_OUT * 256 * 4 * 0.8


@pytest.fixture(scope="module")
def wide_gpt():
    """The example GPT wide enough (d_model 192) for the exporter to keep its indices packed."""
    from planc.compiler.model import capture, load_model

    loaded = load_model(gpt_source().model_copy(update={"args": {"n_layer": 1, "d_model": 192, "n_head": 4}}))
    return loaded, capture(loaded)


def test_artifact_matches_plancs_graph_and_reports_the_load(wide_gpt, tmp_path):
    loaded, gm = wide_gpt
    graph, summaries = run_passes(loaded, gm, (Cluster(bits=4), linear_paths(loaded)))
    target = OnnxTarget.model_validate({
        "verify": {"metric": "cosine", "goal": ">= 0.9", "data": str(SENTENCES), "samples": 4},
        "bench": {"runs": 3, "seq": 32},
    })
    report = build_onnx_artifact(graph, loaded, target, tmp_path / "gpt-cluster", summaries, "").report
    at_load = report["cluster"]
    assert at_load["lookups_in_file"] >= 4  # the [192, 192] and [768, 192] projections stay packed
    assert at_load["weight_bytes_in_file"] < report["size_bytes"]["original"] / 3
    assert at_load["expanded_at_load"] == (at_load["lookups_after_load"] < at_load["lookups_in_file"])
    assert embedding_scheme(graph) == "int4"  # quantize_embeddings beside 4-bit clusters: int4 tables
    texts = ["def main():\n    return 0\n", "import os"]
    inputs = loaded.tokenizer.encode_batch(texts, pad_left=True)
    with torch.no_grad():
        planc_graph = graph(**inputs)
    want = (planc_graph[0] if isinstance(planc_graph, (tuple, list)) else planc_graph).numpy()
    got = next(iter(run_artifact(tmp_path / "gpt-cluster", texts).values()))
    mask = inputs["attention_mask"].bool().numpy()
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-4 * np.abs(want[mask]).max())
