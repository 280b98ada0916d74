"""The front half of the CLI: exit codes, speed without torch, schema, explain, emit stages."""

from __future__ import annotations

from pathlib import Path

import json
import subprocess
import sys
import time

from compiler.cli import main
ROOT = Path(__file__).resolve().parents[2]

GOLDEN = ROOT / "tests" / "golden"


def planc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_check_does_not_import_torch_and_is_fast() -> None:
    plan = str(ROOT / "examples" / "minilm_int8.plan")
    code = (
        "import sys, time; from compiler.cli import main; t = time.perf_counter(); "
        f"rc = main(['check', '-q', {plan!r}]); dt = time.perf_counter() - t; "
        "assert 'torch' not in sys.modules, 'check imported torch'; print(rc, dt)"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    rc, _ = result.stdout.split()
    assert rc == "0"
    assert wall < 5.0  # the whole interpreter; the README quotes the measured figure


def test_exit_codes() -> None:
    assert planc("check", str(GOLDEN / "parse" / "minimal.plan")).returncode == 0
    bad = planc("check", str(GOLDEN / "errors" / "three_mistakes.plan"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.count(": error: ") == 3
    assert planc("check").returncode == 2
    assert planc("frobnicate").returncode == 2
    missing = planc("check", "no/such.plan")
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_schema_is_json_with_every_pass() -> None:
    result = planc("schema")
    schema = json.loads(result.stdout)
    assert set(schema["passes"]) == {"prune", "lowrank", "quantize", "cast", "partition"}
    assert "sparsity" in schema["passes"]["prune"]["properties"]
    assert set(schema["targets"]) == {"onnx", "train"}


def test_emit_front_stages(capsys) -> None:
    plan = str(GOLDEN / "parse" / "selectors.plan")
    assert main(["compile", plan, "--emit", "ir"]) == 0
    assert "BinSel @" in capsys.readouterr().out
    assert main(["compile", plan, "--emit", "resolved"]) == 0
    assert "keep_fp32 = [layernorm, softmax, embedding]" in capsys.readouterr().out
    assert main(["compile", plan, "--emit", "ast"]) == 0
    assert "SelectStmt" in capsys.readouterr().out


def test_explain_fills_defaults(capsys) -> None:
    assert main(["explain", str(GOLDEN / "parse" / "minimal.plan")]) == 0
    out = capsys.readouterr().out
    assert 'model m = factory("mypkg.models:tiny")' in out and "inputs { input_ids: int64[batch, seq] }" in out
