"""The verify gate lets nothing slip: a plan without a goal is held to its metric's default, a goal
is judged on every sample or the compile fails, and `goal = none` publishes an artifact that the
report, the CLI table and `planc bench` call unverified, in words."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from planc.backends.onnx.artifact import VerificationFailed, build_onnx_artifact
from planc.backends.onnx.options import OnnxTarget
from onnx_helpers import SENTENCES

LINES = [line for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
BENCH = {"runs": 3, "seq": 32}
#: The documented default goal of `metric = cosine` (README, "Default goals").
COSINE_DEFAULT = ">= 0.99"


def _target(**verify) -> OnnxTarget:
    return OnnxTarget.model_validate({"verify": {"metric": "cosine", "data": str(SENTENCES), **verify}, "bench": BENCH})


@pytest.fixture(scope="module")
def damaged(tiny_bert):
    """The tiny BERT's graph with its word embeddings replaced by noise: far from the eager model."""
    _, gm = tiny_bert
    broken = copy.deepcopy(gm)
    table = next(p for p in broken.parameters() if p.shape == (30522, 64))
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(0)) * 3)
    return broken


def test_a_plan_without_a_goal_is_held_to_its_metrics_default(tiny_bert, damaged, tmp_path):
    loaded, _ = tiny_bert
    with pytest.raises(VerificationFailed, match=f"does not meet the goal '{COSINE_DEFAULT}'"):
        build_onnx_artifact(damaged, loaded, _target(samples=8), tmp_path / "default", [], "")
    assert not (tmp_path / "default").exists()


def test_goal_none_publishes_unverified_and_says_so(tiny_bert, damaged, tmp_path, capsys):
    from planc.compiler.cli import _print_report, main

    loaded, _ = tiny_bert
    target = _target(samples=8, goal=None)
    result = build_onnx_artifact(damaged, loaded, target, tmp_path / "unverified", [], "")
    accuracy = json.loads((result.path / "report.json").read_text())["accuracy"]
    assert accuracy["goal"] is None and accuracy["passed"] is None and accuracy["value"] < 0.99
    _print_report(result.report)
    assert "UNVERIFIED" in capsys.readouterr().out
    assert main(["bench", str(result.path), "--runs", "3"]) == 0
    printed = capsys.readouterr().out
    assert "UNVERIFIED: published without a goal (goal = none)" in printed and str(result.path)[-20:] in printed


def test_a_goal_is_judged_on_every_sample_or_the_compile_fails(tiny_bert, tmp_path):
    """Out of time after one sample: with a goal nothing is published and the error says how many
    samples were scored; without one the report records scored/available."""
    loaded, gm = tiny_bert
    with pytest.raises(VerificationFailed, match=rf"only 1 of {len(LINES)} verification samples were scored in max_seconds = 1e-06"):
        build_onnx_artifact(gm, loaded, _target(max_seconds=1e-6), tmp_path / "timed", [], "")
    assert not (tmp_path / "timed").exists()
    report = build_onnx_artifact(gm, loaded, _target(max_seconds=1e-6, goal=None), tmp_path / "partial", [], "").report
    assert (report["accuracy"]["samples"], report["accuracy"]["available"]) == (1, len(LINES))


def test_every_sample_is_scored_and_recorded(tiny_bert, tmp_path):
    loaded, gm = tiny_bert
    report = build_onnx_artifact(gm, loaded, _target(), tmp_path / "all", [], "").report
    accuracy = report["accuracy"]
    assert accuracy["samples"] == accuracy["available"] == len(LINES)
    assert accuracy["goal"] == COSINE_DEFAULT and accuracy["passed"] is True


def test_a_decoder_judged_by_perplexity_needs_held_out_text(tmp_path):
    """`planc check` rejects the plan (tests/compile/test_heldout_check.py); called directly, the
    builder says why instead of failing on a missing number."""
    from planc.backends.onnx.decoder.artifact import build_decoder_artifact

    target = OnnxTarget.model_validate({"decode": {}, "verify": {"metric": "perplexity_delta"}})
    with pytest.raises(VerificationFailed, match="perplexity_delta needs held-out text"):
        build_decoder_artifact(None, target, None, tmp_path / "decoder", None, [], "")
    assert not (tmp_path / "decoder").exists()
