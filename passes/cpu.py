"""The CPU an int8 artifact is compiled for, and the integer arithmetic ONNX Runtime does on it.

ONNX Runtime's u8 x s8 integer kernels (`MatMulInteger`, `DynamicQuantizeMatMul`, `QAttention`,
`MatMulIntegerToFloat`, `QLinearMatMul`) multiply-add byte pairs with a different instruction
per CPU, and not every instruction sums exactly:

- `x86_vnni` (AVX-512 VNNI or AVX-VNNI: `VPDPBUSD`) and `arm64` (`UDOT`/`SDOT`, widening
  multiplies) accumulate in int32: exact for any int8 weight.
- `x86_avx2` (AVX2, or AVX-512BW without VNNI: `VPMADDUBSW`) adds each pair of u8 x s8 products
  into an int16 with saturation, then sums the pairs in int32:
  `acc[i, j] = sum_{k even} sat16(a[i,k] b[k,j] + a[i,k+1] b[k+1,j]) - zp_a * sum_k b[k,j]`,
  `a` the raw uint8 activations. Full-range weights (+-127) overflow the pair sum
  (2 * 255 * 127 > 32767); weights in +-63 (7 bits, ONNX Runtime's `reduce_range`) never do.

So the target decides the int8 weight format: full-range s8 where the sums are exact, 7-bit s8
where they saturate (exact there too, and the fastest kernel; u8 x u8 would also be exact on
AVX2 but runs half as many products per instruction). `auto` reads the compiling machine.

This module imports neither torch nor onnxruntime: `planc check` and `explain` use it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, get_args

CpuName = Literal["x86_avx2", "x86_vnni", "arm64"]
CPU_NAMES: tuple[CpuName, ...] = get_args(CpuName)
Arithmetic = Literal["exact", "u8s8_sat16"]

#: Largest |activation byte x weight| pair sum that still fits an int16: 2 * 255 * 63 = 32130.
SAT16_SAFE_WEIGHT = 63


@dataclass(frozen=True)
class Int8Format:
    """How int8 weights are stored for a target CPU, and how its kernels sum them."""

    cpu: CpuName
    #: Symmetric weights lie in [-weight_max, weight_max].
    weight_max: int
    #: The integer arithmetic of ONNX Runtime's u8 x s8 kernels on this CPU.
    arithmetic: Arithmetic
    why: str

    @property
    def label(self) -> str:
        bits = 8 if self.weight_max == 127 else 7
        return f"s8 weights, {bits}-bit range [-{self.weight_max}, {self.weight_max}]"

    def as_dict(self) -> dict:
        return {"cpu": self.cpu, "weights": self.label, "weight_max": self.weight_max, "arithmetic": self.arithmetic, "why": self.why}


FORMATS: dict[CpuName, Int8Format] = {
    "x86_vnni": Int8Format(
        "x86_vnni", 127, "exact", "VNNI (VPDPBUSD) sums u8 x s8 products exactly in int32: full-range weights"
    ),
    "x86_avx2": Int8Format(
        "x86_avx2",
        SAT16_SAFE_WEIGHT,
        "u8s8_sat16",
        "AVX2 without VNNI (VPMADDUBSW) saturates u8 x s8 pair sums to int16: 7-bit weights keep every sum exact",
    ),
    "arm64": Int8Format("arm64", 127, "exact", "ARM64 integer dot products accumulate exactly in int32: full-range weights"),
}


def cpu_of(flags: set[str], machine: str) -> CpuName:
    """The target family of a CPU given its /proc/cpuinfo flags and `platform.machine()`."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    if flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"}:
        return "x86_vnni"
    return "x86_avx2"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@cache
def host_cpu() -> CpuName:
    """The target family of the machine this process runs on (read once)."""
    return cpu_of(_cpu_flags(), platform.machine())


def resolve(cpu: str) -> CpuName:
    """`auto` -> the host's family; a named target stays itself."""
    if cpu == "auto":
        return host_cpu()
    if cpu not in CPU_NAMES:
        raise ValueError(f"unknown cpu target {cpu!r}; expected auto or one of {', '.join(CPU_NAMES)}")
    return cpu  # type: ignore[return-value]


#: The family whose int8 sums are least exact (the narrowest weight range): what a search that
#: must hold on every machine assumes when the plan leaves the target CPU to `auto`.
LEAST_EXACT: CpuName = min(CPU_NAMES, key=lambda name: FORMATS[name].weight_max)


def portable(cpu: str) -> CpuName:
    """The family whose arithmetic a compile-time decision is scored with: a named target is
    itself; `auto` is LEAST_EXACT, not the compiling machine, so the decision is the same on every
    machine and holds on the one with the least exact sums."""
    return LEAST_EXACT if cpu == "auto" else resolve(cpu)


def int8_format(cpu: str = "auto") -> Int8Format:
    return FORMATS[resolve(cpu)]


def numerics_differ(weight_max: int, runs_on: CpuName | None = None) -> bool:
    """Whether int8 weights up to `weight_max` sum differently on `runs_on` than exactly."""
    runs_on = runs_on or host_cpu()
    return FORMATS[runs_on].arithmetic == "u8s8_sat16" and weight_max > SAT16_SAFE_WEIGHT
