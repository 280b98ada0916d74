"""The front half of the CLI: exit codes, speed without torch, schema, explain, emit stages."""

from __future__ import annotations

from pathlib import Path

import io
import json
import subprocess
import sys
import time

from planc.compiler.cli import main
ROOT = Path(__file__).resolve().parents[2]

GOLDEN = ROOT / "tests" / "golden"


def planc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planc.compiler.cli", *args], capture_output=True, text=True, cwd=ROOT)


#: What `planc check` may import of planc itself: the text front end, the IR, the option models.
CHECK_MAY_IMPORT = {
    f"planc.{name}" for name in (
        "dsl", "dsl.ast", "dsl.parser", "dsl.source", "dsl.transform",
        "compiler", "compiler.cli", "compiler.ir", "compiler.validate", "compiler.targets", "compiler.textdata",
        "passes", "passes.options", "passes.cpu",
        "passes.cast", "passes.cluster", "passes.lowrank", "passes.partition", "passes.prune", "passes.quantize",
        "passes.share",
        "backends", "backends.onnx", "backends.onnx.options", "backends.onnx.target", "backends.onnx.heldout",
        "backends.train", "backends.train.options", "backends.train.checks", "backends.train.target",
    )
} | {"planc"}
#: Libraries `planc check` must never load: each costs from 0.1 s (numpy) to seconds (torch).
HEAVY = {"torch", "numpy", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "transformers", "rich", "tqdm", "scipy"}


def test_check_imports_only_what_validation_needs() -> None:
    plan = str(ROOT / "examples" / "minilm_int8.plan")
    code = (
        "import sys, json; from planc.compiler.cli import main; "
        f"rc = main(['check', '-q', {plan!r}]); "
        "print(json.dumps([rc, sorted(sys.modules)]))"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    rc, modules = json.loads(result.stdout)
    assert rc == 0
    assert not {m.split(".")[0] for m in modules} & HEAVY, sorted({m.split(".")[0] for m in modules} & HEAVY)
    planc_modules = {m for m in modules if m.split(".")[0] == "planc"}
    assert planc_modules <= CHECK_MAY_IMPORT, sorted(planc_modules - CHECK_MAY_IMPORT)
    assert wall < 5.0  # the whole interpreter, even on a loaded machine; the README quotes the measured figure


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
    assert set(schema["passes"]) == {"prune", "lowrank", "quantize", "cast", "partition", "share", "cluster"}
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


def test_a_decoder_is_verified_by_top1_unless_the_plan_says_otherwise(tmp_path, capsys) -> None:
    model = 'model m = factory("mypkg.models:tiny") { task = causal_lm }\n'
    for verify, metric in [("", "top1"), ("verify { metric = perplexity_delta }, ", "perplexity_delta")]:
        plan = tmp_path / "d.plan"
        plan.write_text(model + f'target onnx {{ {verify}decode {{ max_new_tokens = 4, heldout = "d.plan" }} }}\n')
        assert main(["explain", str(plan)]) == 0
        assert f"verify {{ metric = {metric}," in capsys.readouterr().out
    plan.write_text(model + "target onnx { }\n")
    assert main(["explain", str(plan)]) == 0
    assert "verify { metric = cosine," in capsys.readouterr().out


def test_version_names_planc_and_its_engines() -> None:
    from importlib import metadata

    result = planc("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"planc {metadata.version('planc')} (")
    for name in ("torch", "onnxruntime", "transformers"):
        assert f"{name} {metadata.version(name)}" in line


def test_pass_table_fits_80_columns_one_line_per_pass() -> None:
    """A long summary is cut with an ellipsis instead of wrapping every row over a dozen lines."""
    from rich.console import Console

    from planc.compiler.cli import records_table
    from planc.passes.manager import GraphStats, PassRecord

    summary = "pruned 12 Linear to 50.0% sparsity (sparsegpt, 50.0% per block) in 3.2s; " * 3
    records = [
        PassRecord("prune", summary, {}, GraphStats(1234, 123_456_789, 493_827_156), GraphStats(1234, 123_456_789, 493_827_156)),
        PassRecord("quantize", "quantized 12 Linear to int4", {}, GraphStats(1234, 123_456_789, 493_827_156), GraphStats(1300, 1_000, 70_000_000)),
    ]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(records_table(records, 80))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert len(lines) == 1 + 3 + len(records) + 1  # title, top border + header + rule, one per pass, bottom
    assert "prune" in lines[4] and "…" in lines[4] and "123M -> 123M" in lines[4] and "494MB -> 494MB" in lines[4]
    assert "quantize" in lines[5] and "1.3k" not in lines[5] and "1234 -> 1300" in lines[5]
