"""bench/bench_decode.py runs end to end and reports both engines for every batch size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path, gpt2_dir):
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench/bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    results = bench.main(["--model", str(gpt2_dir), "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "4",
                          "--rounds", "1", "--threads", "1", "--out", str(tmp_path / "bench.md"), "--json", str(out)])
    rows = {(r["engine"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {("transformers", 1), ("ort-int8", 1), ("transformers", 2), ("ort-int8", 2)}
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows.values())
    assert rows[("transformers", 1)]["decode_x"] == 1.0
    written = json.loads(out.read_text())
    assert written["rows"] == results["rows"]
    assert written["command"].startswith("python bench/bench_decode.py --model")
    assert (tmp_path / "bench.md").read_text().count("| ort-int8 |") == 2


def test_builder_bench_smoke(tmp_path, llama_dir, capsys):
    """bench/bench_builder.py end to end on the small Llama: planc rows scored against the eager
    model and timed in both loops; the builder rows skip with one line when onnxruntime_genai
    is not importable here (it lives in its own environment)."""
    spec = importlib.util.spec_from_file_location("bench_builder", ROOT / "bench/bench_builder.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    variants = ["planc int4 (int8 compute)", "planc fp32", "builder int4"]
    results = bench.main(["--model", str(llama_dir), "--out", str(tmp_path / "art"), "--variants", *variants,
                          "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                          "--windows", "2", "--threads", "1"])
    rows = {r["variant"]: r for r in results["rows"]}
    if not bench.has_genai():
        assert "skipping the builder rows" in capsys.readouterr().out
        variants = variants[:2]
    assert list(rows) == variants
    assert rows["planc fp32"]["top1"] == 1.0
    assert abs(rows["planc fp32"]["perplexity"] - results["eager_perplexity"]) < 1e-3 * results["eager_perplexity"]
    for row in rows.values():
        assert all(row[f"{kind}_b{b}"] > 0 for kind in ("loop", "own") for b in (1, 2))
        assert row["loops_agree_b1"] and row["loops_agree_b2"]  # both runtimes generate the same tokens
