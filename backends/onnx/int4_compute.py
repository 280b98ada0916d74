"""How ONNX Runtime multiplies int4 weights: `MatMulNBits`' `accuracy_level`.

Level 0 dequantizes the weights and multiplies in fp32, exactly planc's reference op. Level 4
quantizes each block of activations to int8 inside the kernel and uses integer dot products:
faster where the CPU has them (`bench/bench_int4_compute.py`, `bench/results/int4_compute.md`,
on 2 Intel Xeon cores with AVX-512 VNNI: a Llama-config int4 decoder generated 1.26x the tokens/s
at batch 1 and 1.30x at batch 8), a little less exact.

`target onnx { int4_compute = auto }`: an encoder artifact is built both ways, verified both
ways and the faster one that meets the plan's goal is kept (`choose`). A decoder, which may be a
real-sized checkpoint, is not built twice: `planned` picks int8 compute where the target CPU has
integer dot products (x86_vnni, arm64) and fp32 compute elsewhere, and only that one is
verified; an int8-compute decoder that misses the goal falls back to fp32 compute (planc's
reference arithmetic) and is verified again. `fp32` / `int8` force one. The report says which
was kept, why, and what each verified variant measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

Compute = Literal["fp32", "int8"]
LEVELS: dict[Compute, int] = {"fp32": 0, "int8": 4}


def planned(requested: str, cpu: str) -> tuple[Compute, str]:
    """The compute a decoder's int4 weights are verified with first, and why."""
    if requested in LEVELS:
        return requested, "named by the plan"  # type: ignore[return-value]
    from planc.passes.cpu import int8_format

    target = int8_format(cpu).cpu
    if target in ("x86_vnni", "arm64"):
        return "int8", f"{target} has integer dot products: int8 activations inside MatMulNBits run faster"
    return "fp32", f"{target} has no integer dot products (VNNI): fp32 compute"


def set_compute(path: Path, compute: Compute) -> int:
    """`with_compute` in place."""
    return with_compute(path, path, compute)


def int4_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "MatMulNBits"]


def set_levels(model: Any, compute: Compute) -> int:
    """Every MatMulNBits of `model` (onnx_ir, before it is saved) at `compute`'s accuracy level;
    returns how many."""
    import onnx_ir as ir

    nodes = [node for node in model.graph if node.op_type == "MatMulNBits"]
    for node in nodes:
        node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", LEVELS[compute])
    return len(nodes)


def with_compute(source: Path, destination: Path, compute: Compute) -> int:
    """Write `source` to `destination` with every MatMulNBits at `compute`'s accuracy level.

    Returns how many nodes were set. External weights (`<name>.data`) are written beside
    `destination` the same way.
    """
    external = source.with_name(source.name + ".data").exists()
    model = onnx.load(str(source), load_external_data=True)
    nodes = int4_nodes(model)
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", LEVELS[compute])])
    data = destination.with_name(destination.name + ".data")
    if data.exists():  # onnx appends external tensors to an existing file: it would hold both copies
        data.unlink()
    onnx.save_model(model, str(destination), save_as_external_data=external,
                    location=data.name if external else None)
    return len(nodes)


@dataclass
class Candidate:
    """One way to run the int4 weights, once verified and timed."""

    compute: Compute
    path: Path
    passed: bool | None
    #: Higher is better: tokens/s, or 1 / latency.
    speed: float
    details: dict[str, Any] = field(default_factory=dict)


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The fastest candidate whose verification did not fail (None if all failed)."""
    usable = [c for c in candidates if c.passed is not False]
    return max(usable, key=lambda c: c.speed) if usable else None


def report(chosen: Candidate, candidates: list[Candidate], requested: str) -> dict[str, Any]:
    return {
        "requested": requested,
        "chosen": chosen.compute,
        "accuracy_level": LEVELS[chosen.compute],
        "candidates": {c.compute: {"passed": c.passed, "speed": round(c.speed, 3), **c.details} for c in candidates},
    }
