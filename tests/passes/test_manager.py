"""PassManager records, lint/recompile, error wrapping; the lazy registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pass_helpers import make_ctx, modules_of_type
from planc.passes.base import GraphPass, PassError, PassResult
from planc.passes.manager import GraphStats, PassManager, graph_code
from planc.passes.lowrank import LowRank
from planc.passes.partition import Partition
from planc.passes.prune import Prune
from planc.passes.quantize import Quantize
from planc.passes.options import pass_options
from planc.passes.registry import load_pass


def test_records_stats_and_leaves_input_untouched(small_gpt):
    model, inputs, gm = small_gpt
    before = GraphStats.of(gm)
    linears = modules_of_type(model, "Linear")
    steps = [
        (load_pass(Prune(method="channels", sparsity=0.5)), make_ctx(model, inputs, {"blocks.0.mlp"}, source="p.plan:3:1")),
        (load_pass(Quantize()), make_ctx(model, inputs, linears, source="p.plan:4:1")),
    ]
    out, records = PassManager().run(gm, steps)
    assert [r.name for r in records] == ["prune", "quantize"]
    assert records[0].before == before and records[1].before == records[0].after
    assert records[1].after == GraphStats.of(out)
    # Independent counts: params and bytes straight from the module.
    assert before.params == sum(p.numel() for p in model.parameters())
    assert before.bytes == 4 * before.params
    assert records[0].after.params == before.params - 2 * 256 * 128 - 256
    quantized = records[1].details
    assert records[1].before.bytes - records[1].after.bytes == quantized["bytes_before"] - quantized["bytes_after"]
    assert quantized["bytes_before"] > 3.9 * quantized["bytes_after"]
    assert GraphStats.of(gm) == before  # the caller's module was copied, not changed
    fc_in = next(n for n in out.graph.nodes if n.meta.get("nn_module_stack") and "blocks.0.mlp.fc_in" in str(n.meta["nn_module_stack"]) and n.op == "call_function")
    assert fc_in.meta["planc_source"] == "p.plan:4:1"
    assert fc_in.meta["planc_history"] == ["p.plan:3:1", "p.plan:4:1"]
    out.graph.lint()
    assert "planc.linear_int8_dynamic" in graph_code(out)


def test_failure_is_wrapped_with_pass_history(small_gpt):
    model, inputs, gm = small_gpt

    class Exploding(GraphPass):
        def call(self, gm, ctx):
            raise ValueError("boom")

    class Named:
        name = "quantize"

    steps = [
        (load_pass(Prune()), make_ctx(model, inputs, {"blocks.0"})),
        (Exploding(Named()), make_ctx(model, inputs, set(), source="p.plan:9:2")),
    ]
    with pytest.raises(PassError) as info:
        PassManager().run(gm, steps)
    assert str(info.value) == "while running 'quantize' after ['prune']: ValueError: boom"
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.source == "p.plan:9:2"


def test_pass_errors_keep_their_message(small_gpt):
    model, inputs, gm = small_gpt
    with pytest.raises(PassError, match=r"^while running 'lowrank': lowrank found no Linear"):
        PassManager().run(gm, [(load_pass(LowRank(rank=4)), make_ctx(model, inputs, {"nothing.here"}))])


def test_broken_graph_fails_lint(small_gpt):
    model, inputs, gm = small_gpt

    class Breaks(GraphPass):
        def call(self, gm, ctx):
            node = next(iter(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)))
            node.args = (node.args[0], "not-a-node-target")
            node.target = "missing_attr"
            node.op = "get_attr"
            return PassResult("broke it", {})

    class Named:
        name = "cast"

    with pytest.raises(PassError, match="while running 'cast'"):
        PassManager().run(gm, [(Breaks(Named()), make_ctx(model, inputs, set()))])


def test_registry_is_lazy_and_complete():
    """Finding the passes imports each pass package's option model, never an implementation."""
    code = (
        "import sys, json; from planc.passes.options import pass_options; names = sorted(pass_options()); "
        "from planc.passes.registry import load_pass; from planc.passes.partition import Partition; "
        "before = sorted(m for m in sys.modules if m.startswith(('planc.passes', 'torch'))); "
        "graph_pass = load_pass(Partition(stages=3)); "
        "print(json.dumps([names, before, type(graph_pass).__name__, graph_pass.options.stages, graph_pass.name, "
        "sorted(m for m in sys.modules if m.startswith('planc.passes.prune.'))]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names, before, cls, stages, name, prune_impls = json.loads(result.stdout)
    passes_dir = Path(__file__).resolve().parents[2] / "passes"
    assert names == sorted(init.parent.name for init in passes_dir.glob("*/__init__.py"))
    assert {"cast", "cluster", "lowrank", "partition", "prune", "quantize", "share"} <= set(names)
    packages = {f"planc.passes.{n}" for n in names}
    assert set(before) == packages | {"planc.passes", "planc.passes.options", "planc.passes.registry"}
    assert (cls, stages, name, prune_impls) == ("PartitionPass", 3, "partition", [])
