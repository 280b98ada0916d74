"""The benchmarks behind the README's figures still run: each script, in its smallest
configuration, writes its results file (markdown and json) with the command that reproduces it
and one row per variant. The figures themselves are not checked: they depend on the machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from shared_models import example_gpt_module

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(name: str, tmp_path: Path, arguments: list[str]) -> tuple[str, dict]:
    """Run bench/NAME.py's main into tmp_path; the written markdown and json."""
    out = tmp_path / f"{name}.md"
    bench_module(name).main([*arguments, "--out", str(out)])
    markdown, written = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    assert written["command"].startswith(f"python bench/{name}.py ")
    assert f"    {written['command']}" in markdown
    assert written["revision"] and written["cpu"]["model"] in markdown
    return markdown, written


def table_rows(markdown: str, first_cell: str) -> int:
    return sum(line.startswith(f"| {first_cell} |") for line in markdown.splitlines())


def test_bench_decode(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=None, eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    markdown, written = run_bench("bench_decode", tmp_path, [
        "--model", str(tmp_path / "gpt2"), "--variants", "int8", "fp32", "--batch", "1", "2", "--prompt-len", "4",
        "--new-tokens", "3", "--rounds", "1", "--threads", "1"])
    engines = ["transformers", "ort-int8", "ort-fp32"]
    assert sorted((r["engine"], r["batch"]) for r in written["rows"]) == sorted((e, b) for e in engines for b in (1, 2))
    assert all(table_rows(markdown, engine) == 2 for engine in engines)


def test_bench_int4_compute(tmp_path):
    markdown, written = run_bench("bench_int4_compute", tmp_path, [
        "--layers", "1", "--batch", "1", "--new-tokens", "2", "--rounds", "1", "--threads", "1"])
    assert [(r["compute"], r["batch"]) for r in written["rows"]] == [("fp32", 1), ("int8", 1)]
    assert table_rows(markdown, "fp32 (accuracy_level 0)") == table_rows(markdown, "int8 (accuracy_level 4)") == 1


def test_bench_speculative(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "gpt.pt"
    torch.save(example_gpt_module().gpt(n_layer=4, n_head=4, d_model=128).state_dict(), checkpoint)
    markdown, written = run_bench("bench_speculative", tmp_path, [
        "--checkpoint", str(checkpoint), "--work", str(tmp_path / "work"), "--int8-target", str(tmp_path / "absent"),
        "--distilled", str(tmp_path / "absent.pt"), "--batch", "1", "--new-tokens", "3", "--draft-tokens", "2",
        "--rounds", "1", "--threads", "1"])
    assert [(r["target"], r["draft"]) for r in written["rows"]] == [("fp32", "plain"), ("fp32", "drop"), ("fp32", "drop1")]
    assert all(r["greedy_equal"] for r in written["rows"][1:])  # exact whatever the weights
    assert table_rows(markdown, "fp32") == 3


def test_bench_ddp(tmp_path):
    markdown, written = run_bench("bench_ddp", tmp_path, [
        "--seconds", "0", "--steps", "2", "--layers", "1", "--d-model", "32", "--seq", "16", "--batch", "2"])
    assert written["rounds"] == 1
    assert [r["program"] for r in written["rows"]] == ["hand-written DDP loop", "planc generated train.py"]
    assert all(len(r["rounds_tokens_per_s"]) == 1 and r["tokens_per_s"] > 0 for r in written["rows"])
    assert table_rows(markdown, "hand-written DDP loop") == table_rows(markdown, "planc generated train.py") == 1
