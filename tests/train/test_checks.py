"""Static checks of `target train`: each problem a plan can have is reported, a good plan has none."""

from __future__ import annotations

import pytest

from planc.backends.train import TrainPlanError, check_batch_config
from planc.backends.train.checks import mesh_of
from planc.backends.train.options import TrainTarget
from planc.passes.partition import Partition


def test_consistent_batch_has_no_problem() -> None:
    target = TrainTarget(world_size=4, micro_batch=8, accumulation=2, global_batch=64)
    assert check_batch_config(target) == []


def test_inconsistent_global_batch_is_reported() -> None:
    target = TrainTarget(world_size=4, micro_batch=8, accumulation=2, global_batch=48)
    (problem,) = check_batch_config(target)
    assert "global_batch 48" in problem and "= 64" in problem


def test_global_batch_counts_only_data_parallel_ranks() -> None:
    # 4 processes = 2 pipeline stages x 2 replicas: 2 data-parallel ranks, not 4.
    target = TrainTarget(
        world_size=4, strategy=["pipeline", "ddp"], micro_batch=8, global_batch=16,
        pipeline={"stages": 2, "microbatches": 2},
    )
    assert check_batch_config(target) == []
    assert mesh_of(target).dp == 2


def test_pipeline_problems() -> None:
    target = TrainTarget(world_size=2, strategy=["pipeline"], micro_batch=6, pipeline={"microbatches": 4})
    problems = check_batch_config(target)
    assert any("does not split into pipeline microbatches" in p for p in problems)
    target = TrainTarget(world_size=4, strategy=["pipeline"], micro_batch=8, pipeline={"microbatches": 2})
    assert any("1f1b schedule needs at least as many microbatches" in p for p in check_batch_config(target))
    target = TrainTarget(world_size=4, strategy=["pipeline", "ddp"])
    assert any("needs the number of stages" in p for p in check_batch_config(target))
    # The partition pass decides the stages.
    assert check_batch_config(target, Partition(stages=2)) == []
    target = TrainTarget(world_size=3, strategy=["pipeline", "ddp"], pipeline={"stages": 2, "microbatches": 2})
    assert any("not a multiple" in p for p in check_batch_config(target))


def test_unsupported_combinations_are_reported() -> None:
    assert any("not ddp" in p for p in check_batch_config(TrainTarget(strategy=["ddp", "tensor"], tensor_parallel=2)))
    assert any("tensor_parallel = N" in p for p in check_batch_config(TrainTarget(strategy=["fsdp", "tensor"])))
    fp16_tp = TrainTarget(strategy=["tensor"], precision="fp16")
    assert any("bf16" in p for p in check_batch_config(fp16_tp))
    distill_pp = TrainTarget(strategy=["pipeline"], distill={}, micro_batch=8)
    assert any("distillation" in p for p in check_batch_config(distill_pp))
    nodes = TrainTarget(world_size=4, nodes=2, rdzv_endpoint="localhost:29500")
    assert any("every node can reach" in p for p in check_batch_config(nodes))


def test_mesh_of_raises_every_problem() -> None:
    with pytest.raises(TrainPlanError) as error:
        mesh_of(TrainTarget(world_size=2, micro_batch=4, global_batch=3))
    assert error.value.problems and "global_batch 3" in error.value.problems[0]


def test_tensor_alone_uses_every_process() -> None:
    mesh = mesh_of(TrainTarget(world_size=4, strategy=["tensor"]))
    assert (mesh.pp, mesh.tp, mesh.dp) == (1, 4, 1)
    mesh = mesh_of(TrainTarget(world_size=4, strategy=["fsdp", "tensor"], tensor_parallel=2))
    assert (mesh.pp, mesh.tp, mesh.dp) == (1, 2, 2)
