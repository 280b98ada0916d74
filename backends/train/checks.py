"""Static checks of `target train`: problems found from the plan alone, before anything runs.

The mesh sizes decided here (pipeline stages, tensor-parallel size, data-parallel size) are the
ones the emitted program uses, so the check and the program cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from planc.backends.train.options import TrainTarget
from planc.dsl.source import Diagnostic
from planc.passes.lowrank import LowRank
from planc.passes.partition import Partition
from planc.passes.prune import Prune

if TYPE_CHECKING:  # compiler.ir imports this package's options: no import cycle at run time
    from planc.compiler import ir


class TrainPlanError(ValueError):
    """The training target cannot be emitted as written; `problems` says why, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Mesh:
    """How the plan's processes split into pipeline x data x tensor parallel groups."""

    pp: int
    tp: int
    dp: int


def pipeline_stages(target: TrainTarget, partition: Partition | None) -> int | None:
    """Stages of the pipeline: the partition pass's, `pipeline { stages }`, or every process
    (when pipeline is the only data-splitting strategy); None when it cannot be decided."""
    if "pipeline" not in target.strategy:
        return 1
    if partition is not None:
        return partition.stages
    if target.pipeline.stages is not None:
        return target.pipeline.stages
    if not {"ddp", "fsdp"} & set(target.strategy):
        return target.world_size // (tensor_parallel_size(target) or 1)
    return None


def tensor_parallel_size(target: TrainTarget) -> int | None:
    """Tensor-parallel group size: `tensor_parallel`, or all processes when `tensor` is alone."""
    if "tensor" not in target.strategy:
        return 1
    if target.tensor_parallel is not None:
        return target.tensor_parallel
    if target.strategy == ["tensor"]:
        return target.world_size
    return None


def mesh_of(target: TrainTarget, partition: Partition | None = None) -> Mesh:
    """The (pp, tp, dp) sizes the program will use; raises TrainPlanError if they are undecided."""
    problems = check_batch_config(target, partition)
    if problems:
        raise TrainPlanError(problems)
    pp, tp = pipeline_stages(target, partition), tensor_parallel_size(target)
    assert pp is not None and tp is not None
    return Mesh(pp=pp, tp=tp, dp=target.world_size // (pp * tp))


def check_batch_config(target: TrainTarget, partition: Partition | None = None) -> list[str]:
    """Every static problem of the target's parallelism and batch sizes, as messages a user can act on."""
    problems: list[str] = []
    strategy = set(target.strategy)
    tp = tensor_parallel_size(target)
    pp = pipeline_stages(target, partition)
    if tp is None:
        problems.append(
            f"tensor parallelism combined with {sorted(strategy - {'tensor'})} needs the size of each "
            "tensor-parallel group: set tensor_parallel = N"
        )
    if pp is None:
        problems.append(
            "pipeline combined with data parallelism needs the number of stages: add a partition pass "
            "or set pipeline { stages = N }"
        )
    if "tensor" in strategy and "ddp" in strategy:
        problems.append(
            "tensor parallelism composes with fsdp (2-D FSDP x TP), not ddp: use strategy = [fsdp, tensor]"
        )
    if "tensor" in strategy and target.precision == "fp16" and target.loss_scaling == "dynamic":
        problems.append(
            "fp16 loss scaling cannot unscale a mix of tensor-parallel (DTensor) and replicated "
            "gradients in this torch: use precision = bf16 with tensor parallelism"
        )
    if "pipeline" in strategy and target.distill is not None:
        problems.append(
            "distillation needs the teacher beside the whole student, which pipeline stages split: "
            "use ddp or fsdp with distill"
        )
    if tp is None or pp is None:
        return problems

    if pp == 1 and "pipeline" in strategy:
        problems.append("a pipeline needs at least 2 stages")
    if target.world_size % (pp * tp):
        problems.append(
            f"world_size {target.world_size} is not a multiple of {pp} pipeline stage(s) x "
            f"{tp} tensor-parallel rank(s)"
        )
        return problems
    dp = target.world_size // (pp * tp)
    expected = target.micro_batch * target.accumulation * dp
    if target.global_batch is not None and target.global_batch != expected:
        problems.append(
            f"global_batch {target.global_batch} != micro_batch {target.micro_batch} x accumulation "
            f"{target.accumulation} x {dp} data-parallel rank(s) = {expected}"
        )
    if "pipeline" in strategy:
        chunks = target.pipeline.microbatches
        if target.micro_batch % chunks:
            problems.append(
                f"micro_batch {target.micro_batch} does not split into pipeline microbatches = {chunks}"
            )
        if target.pipeline.schedule == "1f1b" and chunks < pp:
            problems.append(
                f"the 1f1b schedule needs at least as many microbatches as stages ({chunks} < {pp})"
            )
    if target.nodes > 1 and target.rdzv_endpoint is None:
        problems.append(f"{target.nodes} nodes need a rdzv_endpoint = \"host:port\" every node can reach")
    elif target.nodes > 1 and target.rdzv_endpoint.split(":")[0] in {"localhost", "127.0.0.1"}:
        problems.append(
            f"{target.nodes} nodes cannot meet at rdzv_endpoint {target.rdzv_endpoint!r}: "
            "name a host every node can reach"
        )
    return problems


def regularize_problems(plan: ir.Plan, target: ir.Target) -> list[Diagnostic]:
    """What `regularize { }` cannot be combined with, each at the option or step it is about."""
    options: TrainTarget = target.options  # type: ignore[assignment]
    regularize, spans = options.regularize, target.option_spans
    problems: list[Diagnostic] = []
    if regularize is None:
        return problems
    where = spans.get("regularize", target.span)
    split = sorted({"fsdp", "tensor", "pipeline"} & set(options.strategy))
    if split:
        problems.append(Diagnostic("error", f"regularize shrinks whole heads, channels or weights on every rank after "
                                   f"each step, which {', '.join(split)} splits: use strategy = [ddp]", where))
    for step in plan.pipeline:
        if isinstance(step.options, LowRank):
            problems.append(Diagnostic("error", "lowrank replaces the Linear weights regularize acts on: factor them "
                                       "in a compile of the trained weights instead", step.span))
        if not isinstance(step.options, Prune) or not regularize.defers(step.options.method):
            continue
        if step.options.measures_activations:
            option = "reconstruct" if step.options.reconstruct else "importance"
            problems.append(Diagnostic("error", "after regularize, prune removes the groups of smallest weight "
                                       "norm (the zero ones): use importance = l2 or l1, without reconstruct",
                                       step.option_spans.get(option, step.span)))
        if step.options.schedule == "gradual":
            problems.append(Diagnostic("error", f"regularize {{ group = {regularize.group} }} decides which weights "
                                       "reach zero; this prune step then runs once after training: use schedule = "
                                       "oneshot", step.option_spans.get("schedule", step.span)))
    return problems


def sweep_problems(target: ir.Target) -> list[Diagnostic]:
    """Each swept value checked as the option it sets (TrainTarget.trial), at its own span."""
    options: TrainTarget = target.options  # type: ignore[assignment]
    if options.sweep is None:
        return []
    problems = []
    for key, values in options.sweep.swept.items():
        for index, value in enumerate(values):
            span = target.option_spans.get(f"sweep.{key}.{index}") or target.option_spans.get(f"sweep.{key}", target.span)
            try:
                trial = options.trial({key: value})
            except ValidationError as error:
                message = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
                problems.append(Diagnostic("error", f"sweep {key} = {value!r}: {message}", span))
                continue
            except ValueError as error:
                problems.append(Diagnostic("error", str(error), target.option_spans.get(f"sweep.{key}", target.span)))
                break
            problems += [Diagnostic("error", f"sweep {key} = {value!r}: {problem}", span)
                         for problem in check_batch_config(trial)]
    return problems
