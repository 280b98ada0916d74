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
                          "--repeats", "1", "--threads", "1", "--json", str(out)])
    rows = {(r["engine"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {("transformers", 1), ("ort-int8", 1), ("transformers", 2), ("ort-int8", 2)}
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows.values())
    assert rows[("transformers", 1)]["decode_x"] == 1.0
    assert json.loads(out.read_text())["rows"] == results["rows"]
