"""The emitted training program runs on the GPU machine's torch 2.11: every torch name that
planc_runtime and the generated programs use, with the keywords they pass, exists there.

`torch_2_11_api.json` is bench/torch_api.py's record, made once under torch 2.11 (it imports no
planc); the programs themselves ran there too (bench/results/torch211_programs.json).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SURFACE = json.loads((Path(__file__).parent / "torch_2_11_api.json").read_text())


@pytest.fixture(scope="module")
def torch_api():
    spec = importlib.util.spec_from_file_location("torch_api", ROOT / "bench" / "torch_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_api"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("torch_api", None)


def test_the_record_is_torch_2_11():
    assert SURFACE["torch"].startswith("2.11.")


def test_runtime_and_programs_use_only_what_torch_2_11_has(torch_api):
    uses = torch_api.scan()
    files = {u.where.split(":")[0] for u in uses}
    # the scan reads the runtime package and a generated program of every strategy
    assert "backends/train/planc_runtime/parallel.py" in files
    assert {"tests/golden/train/pipeline_1f1b.train.py.txt", "tests/golden/train/tensor.train.py.txt"} <= files
    assert any(u.name == "torch.distributed.fsdp.fully_shard" and "mp_policy" in u.keywords for u in uses)
    assert torch_api.problems(uses, SURFACE) == []


def test_a_name_torch_2_11_lacks_is_reported_with_its_line(torch_api):
    source = "import torch.distributed as dist\n\n\ndef f(x):\n    dist.all_reduce_future(x)\n"
    found = torch_api.problems(torch_api.scan_source(source, "snippet.py"), SURFACE)
    assert found == [
        "snippet.py:5: torch.distributed.all_reduce_future is not in the recorded torch 2.11 API: record it "
        "(bench/torch_api.py record, under torch 2.11) or guard it with a fallback"
    ]


def test_a_keyword_torch_2_11_lacks_is_reported(torch_api):
    # torch 2.13's barrier takes a timeout and fully_shard dp_mesh_dims; torch 2.11's do not
    source = (
        "import torch.distributed as dist\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "dist.barrier(timeout=None)\n"
        "fully_shard(model, mesh=mesh, dp_mesh_dims=None)\n"
    )
    found = torch_api.problems(torch_api.scan_source(source, "snippet.py"), SURFACE)
    assert found == [
        "snippet.py:3: torch.distributed.barrier takes no keyword timeout in torch 2.11",
        "snippet.py:4: torch.distributed.fsdp.fully_shard takes no keyword dp_mesh_dims in torch 2.11",
    ]


def test_a_name_recorded_missing_is_reported(torch_api):
    surface = {**SURFACE, "missing": ["torch.distributed.fsdp.fully_shard"]}
    source = "from torch.distributed.fsdp import fully_shard\n"
    assert torch_api.problems(torch_api.scan_source(source, "snippet.py"), surface) == [
        "snippet.py:1: torch 2.11 has no torch.distributed.fsdp.fully_shard; guard it with a fallback"
    ]


def test_guarded_uses_pass(torch_api):
    source = (
        "import torch\n"
        "import torch.distributed as dist\n"
        "try:\n"
        "    from torch.distributed.newer import thing\n"
        "except ImportError:\n"
        "    thing = None\n"
        "if hasattr(dist, 'all_reduce_future'):\n"
        "    dist.all_reduce_future(torch.zeros(1))\n"
        "else:\n"
        "    dist.all_reduce(torch.zeros(1))\n"
        "try:\n"
        "    dist.barrier(timeout=None)\n"
        "except TypeError:\n"
        "    dist.barrier()\n"
    )
    uses = torch_api.scan_source(source, "snippet.py")
    guarded = {u.name for u in uses if u.guarded}
    assert {"torch.distributed.newer.thing", "torch.distributed.all_reduce_future", "torch.distributed.barrier"} <= guarded
    assert "torch.distributed.all_reduce" not in guarded  # the else branch is the fallback itself
    assert torch_api.problems(uses, SURFACE) == []
