"""The artifact directory: contents, report figures checked against the files, atomic publishing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from planc.backends.onnx import artifact
from planc.backends.onnx.artifact import VerificationFailed, bench_rows, build_onnx_artifact, run_artifact
from planc.backends.onnx.export import export_model, files_size, save_model
from planc.backends.onnx.options import OnnxTarget
from onnx_helpers import SENTENCES, linear_paths, run_passes
from planc.passes.quantize import Quantize

HERE = Path(__file__).resolve().parent


def _target(goal: str = ">= 0.99", **extra) -> OnnxTarget:
    return OnnxTarget.model_validate(
        {"verify": {"metric": "cosine", "goal": goal, "data": str(SENTENCES), "samples": 8}, "bench": {"runs": 3, "seq": 32}, **extra}
    )


@pytest.fixture(scope="module")
def gpt_int8(gpt):
    loaded, gm = gpt
    graph, summaries = run_passes(loaded, gm, (Quantize(scheme="int8"), linear_paths(loaded)))
    return loaded, graph, summaries


@pytest.fixture(scope="module")
def built(gpt_int8, tmp_path_factory):
    loaded, graph, summaries = gpt_int8
    out = tmp_path_factory.mktemp("artifacts") / "gpt-int8"
    return build_onnx_artifact(graph, loaded, _target(), out, summaries, "plan text\n")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_artifact_layout_and_report(built):
    directory = built.path
    assert sorted(p.name for p in directory.iterdir()) == ["model.onnx", "plan.resolved", "report.json"]
    report = json.loads((directory / "report.json").read_text())
    assert report == built.report
    assert (directory / "plan.resolved").read_text() == "plan text\n"
    assert report["provider"] == "CPUExecutionProvider"
    assert report["passes"][0]["name"] == "quantize"
    assert report["accuracy"]["metric"] == "cosine" and report["accuracy"]["passed"] is True
    assert report["accuracy"]["value"] == report["accuracy"]["min"] >= 0.99
    assert report["latency_ms"]["original_eager"] > 0 and report["latency_ms"]["optimized"] > 0
    assert _leftovers(directory.parent) == []


def test_report_sizes_are_the_file_sizes(built, gpt):
    loaded, _ = gpt
    sizes = built.report["size_bytes"]
    assert sizes["optimized"] == os.path.getsize(built.path / "model.onnx")
    fresh = built.path.parent / "fp32-check.onnx"
    save_model(export_model(loaded.model, loaded.example_inputs, loaded.dynamic_shapes), fresh)
    assert abs(sizes["original"] - files_size(fresh)) <= 64  # same export, modulo producer strings
    assert sizes["optimized"] < 0.5 * sizes["original"]
    fresh.unlink()


def test_model_passes_the_checker_and_stores_int8_weights(built, gpt_int8):
    model = onnx.load(str(built.path / "model.onnx"))
    onnx.checker.check_model(model, full_check=False)
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    float_matrices = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) >= 64]
    # The GPT's 2 blocks hold 4 projections each (q|k|v are stored concatenated) and its lm_head.
    assert sum(int(np.prod(i.dims)) for i in int8) >= 2 * 4 * 64 * 64
    assert sorted(i.name for i in float_matrices) == ["pos_emb.weight", "tok_emb.weight"]
    ops = {n.op_type for n in model.graph.node}
    assert "DynamicQuantizeMatMul" in ops and "DequantizeLinear" not in ops


def test_run_artifact_matches_eager(built, gpt):
    loaded, _ = gpt
    texts = ["def main():\n    return 0\n", "import os"]
    outputs = run_artifact(built.path, texts)
    logits = next(iter(outputs.values()))
    inputs = loaded.tokenizer.encode_batch(texts, pad_left=True)
    with torch.no_grad():
        want = loaded.model(**inputs)
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    mask = inputs["attention_mask"].bool().numpy()
    assert logits.shape == want.shape
    cosine = (logits[mask] * want[mask]).sum(-1) / np.linalg.norm(logits[mask], axis=-1) / np.linalg.norm(want[mask], axis=-1)
    assert cosine.min() > 0.99


def test_bench_rows(built):
    rows = bench_rows([built.path, built.path], runs=3)
    assert [r["artifact"] for r in rows] == [str(built.path)] * 2
    assert all(r["latency_ms"] > 0 and r["size_mb"] > 0 for r in rows)
    assert rows[0]["vs_first"] == 1.0


def test_missed_goal_raises_and_publishes_nothing(gpt_int8, tmp_path):
    loaded, graph, summaries = gpt_int8
    out = tmp_path / "never"
    with pytest.raises(VerificationFailed, match=r"cosine = 0\.9\d+ does not meet the goal '>= 1\.01'"):
        build_onnx_artifact(graph, loaded, _target(">= 1.01"), out, summaries, "")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_missed_goal_keeps_the_previous_artifact(gpt_int8, built, tmp_path):
    loaded, graph, summaries = gpt_int8
    out = tmp_path / "kept"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(VerificationFailed):
        build_onnx_artifact(graph, loaded, _target(">= 1.01"), out, summaries, "")
    assert [p.name for p in out.iterdir()] == ["report.json"]


def test_failure_after_a_partial_write_leaves_nothing(gpt_int8, tmp_path, monkeypatch):
    loaded, graph, summaries = gpt_int8
    real_write = artifact._write_json

    def write_then_fail(path, data):
        real_write(path, data)
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact, "_write_json", write_then_fail)
    out = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="disk full"):
        build_onnx_artifact(graph, loaded, _target(), out, summaries, "")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


_KILLED_COMPILE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {here!r})
    from planc.compiler.model import capture, load_model
    from planc.backends.onnx import artifact
    from planc.backends.onnx.options import OnnxTarget
    from onnx_helpers import gpt_source

    real_write = artifact._write_json
    def write_and_hang(path, data):
        real_write(path, data)
        Path({marker!r}).write_text("written")
        time.sleep(600)
    artifact._write_json = write_and_hang
    loaded = load_model(gpt_source())
    target = OnnxTarget.model_validate({{"fusions": False, "bench": {{"runs": 3, "seq": 16}}}})
    artifact.build_onnx_artifact(capture(loaded), loaded, target, {out!r}, [], "")
    """
)


def test_killed_compile_leaves_no_artifact(tmp_path):
    out, marker = tmp_path / "killed", tmp_path / "marker"
    script = _KILLED_COMPILE.format(here=str(HERE), marker=str(marker), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the compile never reached the report"
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    assert not out.exists()
    temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp-")]
    assert len(temporaries) == 1 and (temporaries[0] / "report.json").exists()
    # The next compile to the same place sweeps the dead process's temporary away.
    from planc.compiler.publish import remove_stale_temporaries

    remove_stale_temporaries(out.resolve())
    assert not temporaries[0].exists()


def test_bf16_on_the_cpu_provider_is_a_provider_error(gpt, tmp_path):
    from planc.passes.cast import Cast

    from planc.backends.onnx.runtime import ProviderError

    loaded, gm = gpt
    graph, summaries = run_passes(loaded, gm, (Cast(dtype="bf16"), frozenset()))
    out = tmp_path / "bf16"
    with pytest.raises(ProviderError, match="bf16 is not supported by ONNX Runtime's CPU"):
        build_onnx_artifact(graph, loaded, _target(providers=["cpu"]), out, summaries, "")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_large_models_keep_weights_in_external_data(gpt_int8, tmp_path, monkeypatch):
    """Above the threshold (1 GiB; lowered here) weights go to model.onnx.data, sizes count both."""
    from planc.backends.onnx import export

    loaded, graph, summaries = gpt_int8
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
    result = build_onnx_artifact(graph, loaded, _target(">= 0.9"), tmp_path / "ext", summaries, "")
    files = {p.name: p.stat().st_size for p in result.path.iterdir()}
    assert "model.onnx.data" in files and files["model.onnx.data"] > files["model.onnx"]
    assert result.report["size_bytes"]["optimized"] == files["model.onnx"] + files["model.onnx.data"]
    assert next(iter(run_artifact(result.path, ["import os"]).values())).shape[:2] == (1, 9)


def test_verify_gate_is_not_fooled_by_a_lucky_sample(tiny_bert, tmp_path):
    """A model broken only on words of the later sentences passes a 16-sample check, not the gate."""
    import copy

    loaded, gm = tiny_bert
    lines = [line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [set(loaded.tokenizer.encode_batch([line])["input_ids"].flatten().tolist()) for line in lines]
    early = set().union(*ids[:16])
    late = sorted(set().union(*ids[16:]) - early)
    assert len(late) > 50
    damaged = copy.deepcopy(gm)
    table = next(p for p in damaged.parameters() if p.shape == (30522, 64))
    with torch.no_grad():
        table[late] = torch.randn(len(late), 64, generator=torch.Generator().manual_seed(0)) * 3
    goal = {"metric": "cosine", "goal": ">= 0.99", "data": str(SENTENCES)}
    lucky = OnnxTarget.model_validate({"verify": {**goal, "samples": 16}, "bench": {"runs": 3, "seq": 32}})
    passed = build_onnx_artifact(damaged, loaded, lucky, tmp_path / "lucky", [], "")
    assert passed.report["accuracy"]["min"] > 0.999 and passed.report["accuracy"]["samples"] == 16
    every = OnnxTarget.model_validate({"verify": goal, "bench": {"runs": 3, "seq": 32}})
    with pytest.raises(VerificationFailed, match=rf"over {len(lines)} samples"):
        build_onnx_artifact(damaged, loaded, every, tmp_path / "gated", [], "")
    assert not (tmp_path / "gated").exists()


def test_encoder_report_has_min_mean_and_similarity_spearman(tiny_bert, tmp_path):
    from planc.passes.cpu import host_cpu

    loaded, gm = tiny_bert
    graph, summaries = run_passes(loaded, gm, (Quantize(scheme="int8"), linear_paths(loaded)))
    target = OnnxTarget.model_validate({"verify": {"metric": "cosine", "data": str(SENTENCES)}, "bench": {"runs": 3, "seq": 32}})
    report = build_onnx_artifact(graph, loaded, target, tmp_path / "bert", summaries, "").report
    accuracy = report["accuracy"]
    lines = [line for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert accuracy["samples"] == len(lines)  # every line by default
    assert accuracy["min"] <= accuracy["mean"] <= 1.0 and 0.5 < accuracy["spearman"] <= 1.0
    assert report["cpu"]["target"] == host_cpu() and report["cpu"]["compiled_on"] == host_cpu()
    weights = [i for i in onnx.load(str(tmp_path / "bert" / "model.onnx")).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    widest = max(int(np.abs(onnx.numpy_helper.to_array(w)).max()) for w in weights)
    assert widest == report["cpu"]["int8"]["weight_max"]


# ----------------------------------------------------------------------------- what the CLI prints


@pytest.fixture(scope="module")
def bert_artifact(tiny_bert, tmp_path_factory):
    loaded, gm = tiny_bert
    target = OnnxTarget.model_validate({"verify": {"metric": "cosine", "data": str(SENTENCES), "samples": 4}, "bench": {"runs": 3, "seq": 32}})
    return build_onnx_artifact(gm, loaded, target, tmp_path_factory.mktemp("cli") / "bert", [], "").path


def test_run_prints_sentence_embeddings_and_their_similarities(bert_artifact, capsys, tmp_path):
    from planc.compiler.cli import main

    texts = ["A cat sat on the mat.", "Dogs bark at night.", "A cat was sitting on a mat."]
    assert main(["run", str(bert_artifact), "--input", *texts, "--output", str(tmp_path / "e.npy")]) == 0
    out = capsys.readouterr().out
    assert len(out) < 1500 and max(len(line) for line in out.splitlines()) <= 80
    assert "384" not in out and "64 dimensions" in out and "cosine similarity" in out
    embeddings = np.load(tmp_path / "e.npy")
    expected = run_artifact(bert_artifact, texts)["sentence_embedding"]
    np.testing.assert_allclose(embeddings, expected, rtol=1e-6)
    similarity = embeddings @ embeddings.T
    lines = out.splitlines()
    matrix = lines[lines.index("cosine similarity:") + 2 : lines.index("cosine similarity:") + 2 + len(texts)]
    shown = np.array([[float(v) for v in line.split()[1:]] for line in matrix])
    np.testing.assert_allclose(shown, similarity, atol=1e-3)


def test_run_prints_a_causal_lms_next_tokens(built, capsys, tmp_path):
    from planc.compiler.cli import main

    assert main(["run", str(built.path), "--input", "def main(", "import os", "--output", str(tmp_path / "all.json")]) == 0
    out = capsys.readouterr().out
    assert len(out) < 1000 and out.startswith("next token after each input")
    logits = run_artifact(built.path, ["def main(", "import os"])["next_token_logits"]
    best = bytes([int(logits[0].argmax())]).decode("utf-8", errors="replace")
    assert f"[0] def main(" in out and repr(best) in out.splitlines()[1]
    written = json.loads((tmp_path / "all.json").read_text())
    assert np.asarray(written["next_token_logits"]).shape == logits.shape


def test_run_refuses_an_unknown_output_format(built):
    from planc.compiler.cli import main

    assert main(["run", str(built.path), "--input", "x", "--output", "out.csv"]) == 2


def test_bench_fits_an_80_column_terminal(built, bert_artifact, tmp_path, capsys):
    from planc.compiler.cli import main
    from planc.compiler.present import bench_lines

    deep = tmp_path / ("a-very-long-directory-name-" * 4) / "artifact"
    shutil.copytree(built.path, deep)
    assert main(["bench", str(deep), str(bert_artifact), "--runs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "eager" not in " ".join(lines)
    assert len(lines) == 4 and lines[2].split()[-2] == "1.0"  # the first artifact against itself
    rows = [{"artifact": "x" * 300, "size_mb": 1.5, "latency_ms": 2.0, "vs_first": 1.0, "accuracy_min": 0.99}]
    assert max(len(line) for line in bench_lines(rows)) <= 80
    assert main(["bench", str(bert_artifact), "--runs", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["size_mb"] > 0


@pytest.mark.parametrize("compute", ["fp32", "int8", "auto"])
def test_int4_compute_is_chosen_and_reported(gpt, tmp_path, compute):
    """`int4_compute`: the plan's choice, or (auto) the faster of the two that meets the goal."""
    loaded, gm = gpt
    graph, summaries = run_passes(loaded, gm, (Quantize(scheme="int4", group_size=32), linear_paths(loaded)))
    target = _target(">= 0.9", int4_compute=compute)
    report = build_onnx_artifact(graph, loaded, target, tmp_path / compute, summaries, "").report
    levels = {a.i for n in onnx.load(str(tmp_path / compute / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    if compute == "fp32":
        assert levels == {0} and "int4_compute" not in report
        return
    choice = report["int4_compute"]
    assert choice["requested"] == compute and set(choice["candidates"]) == {"fp32", "int8"}
    expected = "int8" if compute == "int8" else max(
        (c for c in choice["candidates"] if choice["candidates"][c]["passed"] is not False),
        key=lambda c: choice["candidates"][c]["speed"])
    assert choice["chosen"] == expected and levels == {0 if expected == "fp32" else 4}
    assert report["latency_ms"]["optimized"] == choice["candidates"][expected]["latency_ms"]
