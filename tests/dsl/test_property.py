"""Property test: mutated plans never crash planc.

Every example plan is mutated (tokens deleted, duplicated, swapped or replaced, random bytes
inserted, the file truncated) and checked in-process through the CLI entry point. Whatever the
mutant, planc must exit 0 (the mutant happens to be a valid plan) or 1 with at least one
diagnostic whose line:col lies inside the file — never a traceback, never an internal error.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planc.compiler.cli import main
ROOT = Path(__file__).resolve().parents[2]

EXAMPLES = sorted((ROOT / "examples").glob("*.plan"))
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?%?|\s+|.', re.S)
POSITION = re.compile(r"^(?P<file>[^\n:]+\.plan):(?P<line>\d+):(?P<col>\d+): (error|warning): ", re.M)
NOISE = ["{", "}", "[", "]", "(", ")", "=", ",", ";", ":", "..", "|", "&", "-", "?", '"', "#", "pipeline",
         "target", "model", "select", "include", "50%", "1e9", "-1", "prune", "quantize", "Linear", "\x00", "é", "\t"]

CASES_PER_EXAMPLE = max(1, -(-1000 // max(1, len(EXAMPLES))))  # >= 1,000 mutants in all


@st.composite
def mutants(draw, text: str) -> str:
    tokens = TOKEN.findall(text)
    for _ in range(draw(st.integers(1, 3))):
        if not tokens:
            break
        index = draw(st.integers(0, len(tokens) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "bytes", "truncate"]))
        if action == "delete":
            del tokens[index]
        elif action == "duplicate":
            tokens.insert(index, tokens[index])
        elif action == "swap":
            other = draw(st.integers(0, len(tokens) - 1))
            tokens[index], tokens[other] = tokens[other], tokens[index]
        elif action == "replace":
            tokens[index] = draw(st.sampled_from(NOISE))
        elif action == "bytes":
            tokens.insert(index, draw(st.text(min_size=1, max_size=4)))
        else:
            tokens = tokens[:index]
    return "".join(tokens)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of examples/ so mutants resolve data/ and models/ like the originals."""
    target = tmp_path_factory.mktemp("mutants") / "examples"
    shutil.copytree(ROOT / "examples", target, ignore=shutil.ignore_patterns("*.pt", "__pycache__"))
    return target


def run_check(path: Path) -> tuple[int, str]:
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(["check", "--quiet", str(path)])
    return code, stderr.getvalue()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_mutated_plans_give_diagnostics_not_tracebacks(example: Path, workdir: Path) -> None:
    # Comment lines are left out: a mutation there changes nothing, and long headers (the
    # speculative-decoding example's) would make most mutants trivially valid.
    lines = example.read_text(encoding="utf-8").splitlines()
    original = "\n".join(line for line in lines if not line.lstrip().startswith("#")) + "\n"
    outcomes = {"valid": 0, "invalid": 0}

    @settings(max_examples=CASES_PER_EXAMPLE, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(mutants(original))
    def check(text: str) -> None:
        path = workdir / f"mutant_{example.name}"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        code, stderr = run_check(path)
        assert "Traceback" not in stderr and code in (0, 1), f"exit {code}:\n{stderr}\n--- plan ---\n{text}"
        if code == 0:
            outcomes["valid"] += 1
            return
        outcomes["invalid"] += 1
        positions = list(POSITION.finditer(stderr))
        assert positions, f"no line:col in:\n{stderr}"
        line_count = max(1, len(text.splitlines()))
        for match in positions:
            if Path(match["file"]).name == path.name:
                assert 1 <= int(match["line"]) <= line_count + 1 and int(match["col"]) >= 1, stderr

    check()
    # The mutations are meant to break plans: most mutants must be reported as invalid.
    assert outcomes["invalid"] > outcomes["valid"], outcomes
