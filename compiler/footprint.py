"""What a compile needs before it loads anything: parameters, checkpoint bytes, peak memory, time.

A real checkpoint (a 1B-8B decoder in bf16 safetensors) can need more memory than the machine
has; the kernel then kills the compile with no message. So the compiler reads the checkpoint's
safetensors headers (names, dtypes and shapes; never tensor data), predicts the compile's peak
resident memory and its time from them, and refuses at the plan's `model` line a compile that
would not fit the memory available now. The report records the measured peak beside the
prediction, so the model of the compile's memory is checked on every run.

A decode target that prunes in place and quantizes every projection (round-to-nearest, gptq or
awq), or exports the model as it is, streams its weights (`streams_weights`, `compiler/model/deferred.py`): its prediction
follows what it holds, the projections as the artifact stores them (int4, int8 or fp32) and the
rest (embeddings) in fp32, not the fp32 model.

The prediction is a linear model per kind of build, fitted to peak RSS measured with
`/usr/bin/time -v` (figures in `bench/results/footprint.md`): a fixed cost (torch, ONNX Runtime,
transformers and their arenas) plus a multiple of the model's fp32 bytes (the eager model, the
verification reference, the exporter's copies, the artifact ONNX Runtime loads). Models whose
weights planc cannot see before loading them (a Python factory, a config-only directory) get no
prediction.

Standard library only: `planc check` and `planc explain` use it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GB = 10**9

#: Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint as its headers describe it."""

    directory: Path
    params: int
    #: Bytes of tensor data in the files (their dtypes as stored).
    stored_bytes: int
    #: Parameters per stored dtype, e.g. {"BF16": 1235814400}.
    dtypes: dict[str, int]
    #: Elements of the largest tensor (an embedding table, usually).
    largest: int
    #: Elements of the 2-D tensors that are not embedding tables: the projections a streamed
    #: compile reads one at a time (`streams_weights`).
    projection_params: int = 0
    #: The largest input width of those projections (a Llama's MLP down projection reads the
    #: intermediate size): a calibrated method's Hessian is this wide squared.
    widest_input: int = 0

    @property
    def fp32_bytes(self) -> int:
        """The eager model's bytes once loaded: planc builds every model in fp32."""
        return 4 * self.params

    def streamed_bytes(self, projection_bytes: float) -> float:
        """What a streamed compile holds: everything but the projections in fp32, the
        projections at `projection_bytes` each (as the artifact stores them)."""
        return 4 * (self.params - self.projection_params) + projection_bytes * self.projection_params


@dataclass(frozen=True)
class Cost:
    """The linear model of one kind of build: peak = fixed + per_fp32_byte x fp32 bytes (a
    streamed build: x `Checkpoint.streamed_bytes`, plus `per_probed_byte` x the same where the
    graph is small enough for the fusion probe, which runs it twice: `PROBE_BYTES`)."""

    fixed_bytes: float
    per_fp32_byte: float
    seconds_per_gparam: float
    fixed_seconds: float
    per_probed_byte: float = 0.0

    def peak(self, checkpoint: Checkpoint, projection_bytes: float | None = None) -> int:
        """`projection_bytes`: a streamed build's bytes per projection weight."""
        weights = checkpoint.fp32_bytes if projection_bytes is None else checkpoint.streamed_bytes(projection_bytes)
        probed = self.per_probed_byte * weights if weights <= PROBE_BYTES else 0.0
        return int(self.fixed_bytes + self.per_fp32_byte * weights + probed)

    def seconds(self, checkpoint: Checkpoint) -> float:
        return self.fixed_seconds + self.seconds_per_gparam * checkpoint.params / 1e9


def calibration_bytes(checkpoint: Checkpoint, tokens: int) -> int:
    """What a streamed calibrated method (gptq, awq) holds beyond a round-to-nearest compile
    while it solves the widest input: the Hessian and the fp64 factorization's workspace
    (`HESSIAN_COPIES` fp32-sized copies), and the calibration activations the walk keeps live."""
    width = checkpoint.widest_input
    return int(4 * HESSIAN_COPIES * width * width + 4 * LIVE_ACTIVATIONS * tokens * width)


def calibration_seconds(checkpoint: Checkpoint, tokens: int) -> float:
    """A calibrated method's time: the Gram products and GPTQ's per-layer solves, which grow
    with the parameters times the tokens (`CALIBRATION_SECONDS` per Gparam per 1k tokens)."""
    return CALIBRATION_SECONDS * checkpoint.params / 1e9 * max(tokens, 1) / 1000


#: Decoder graphs with up to this many bytes of weights are run fused and unfused to check the
#: fusions (`backends/onnx/decoder/fusions.py`); larger ones keep them unchecked.
PROBE_BYTES = 1 << 30
#: Bytes per projection weight in a streamed build's artifact: int4 is 4 bits plus an fp32 scale
#: per group of 32; int8 a byte plus a scale per row; an empty pipeline exports fp32.
PROJECTION_BYTES = {"int4": 0.5 + 4 / 32, "int8": 1.0, "fp32": 4.0}
#: Names of the tensors a streamed compile loads whole (token and position tables).
EMBEDDING_NAMES = ("embed", "wte", "wpe")
#: A calibrated streamed compile (`calibration_bytes`): fp32-sized [in, in] copies alive at
#: once while the widest input is solved (Gram, Hessian, fp64 Cholesky factor, identity and
#: inverse), activations [tokens, width] live in the walk, and seconds per Gparam per 1k
#: calibration tokens. Fitted to the 1B GPTQ compile in `bench/results/footprint.md`.
HESSIAN_COPIES = 6
LIVE_ACTIVATIONS = 6
CALIBRATION_SECONDS = 80.0

#: Fitted to the measurements in `bench/results/footprint.md` (2-core x86 machines, 24 GB).
#: "streamed": `per_fp32_byte` multiplies `Checkpoint.streamed_bytes(...)`, not the fp32 bytes.
COSTS: dict[str, Cost] = {
    "streamed": Cost(fixed_bytes=0.8 * GB, per_fp32_byte=2.85, seconds_per_gparam=110.0, fixed_seconds=80.0, per_probed_byte=3.1),
    "decoder": Cost(fixed_bytes=1.6 * GB, per_fp32_byte=5.8, seconds_per_gparam=520.0, fixed_seconds=20.0),
    "encoder": Cost(fixed_bytes=0.9 * GB, per_fp32_byte=3.0, seconds_per_gparam=400.0, fixed_seconds=30.0),
}


@dataclass(frozen=True)
class Footprint:
    """The prediction for one compile, and the memory the machine has for it."""

    checkpoint: Checkpoint
    build: str
    peak_bytes: int
    seconds: float
    available_bytes: int | None
    #: A streamed build's bytes per projection weight (`PROJECTION_BYTES`).
    projection_bytes: float | None = None
    #: What a calibrated method adds to the peak (`calibration_bytes`; 0 without one).
    calibration_bytes: int = 0
    #: Temporary disk a streamed compile that prunes needs for the pruned weights (fp32), and
    #: what the temporary directory has free (`spill_room`).
    spill_bytes: int = 0
    spill_free_bytes: int | None = None

    @property
    def spill_fits(self) -> bool:
        return self.spill_free_bytes is None or self.spill_bytes <= self.spill_free_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= self.available_bytes

    def describe(self) -> str:
        dtypes = "/".join(sorted(self.checkpoint.dtypes)).lower()
        where = f" of {self.available_bytes / GB:.1f} GB available" if self.available_bytes is not None else ""
        return (f"{self.checkpoint.params / 1e9:.2f}B parameters ({dtypes}, {self.checkpoint.stored_bytes / GB:.2f} GB on disk): "
                f"predicted peak memory {self.peak_bytes / GB:.1f} GB{where}, about {_duration(self.seconds)}")

    def as_dict(self) -> dict[str, Any]:
        return {"build": self.build, "params": self.checkpoint.params, "checkpoint_bytes": self.checkpoint.stored_bytes,
                "predicted_peak_bytes": self.peak_bytes, "predicted_seconds": round(self.seconds, 1),
                "available_bytes": self.available_bytes}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: those its index names, else every `*.safetensors`."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    return sorted(directory.glob("*.safetensors"))


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: {tensor name: {dtype, shape, data_offsets}} (no data read)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path} is not a safetensors file (header of {length} bytes)")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def read_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in `directory`, or None when it has no safetensors weights."""
    files = safetensors_files(directory)
    if not files or not all(f.is_file() for f in files):
        return None
    params = stored = largest = projections = widest = 0
    dtypes: dict[str, int] = {}
    for file in files:
        for name, entry in read_header(file).items():
            count = 1
            for dim in entry["shape"]:
                count *= dim
            params += count
            if len(entry["shape"]) == 2 and not any(key in name for key in EMBEDDING_NAMES):
                projections += count
                widest = max(widest, entry["shape"][1])
            stored += count * DTYPE_BYTES.get(entry["dtype"], 4)
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + count
            largest = max(largest, count)
    return Checkpoint(directory, params, stored, dtypes, largest, projections, widest)


def spill_room() -> int | None:
    """Free bytes in the temporary directory (`TMPDIR`), where pruned weights are spilled."""
    import shutil
    import tempfile

    try:
        return shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return None


def available_memory() -> int | None:
    """Bytes this process can still take without swapping (Linux `MemAvailable`), or None."""
    override = os.environ.get("PLANC_AVAILABLE_MEMORY")
    if override:
        return int(float(override))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def predict(checkpoint: Checkpoint, build: str, projection_bytes: float | None = None, calibration_tokens: int = 0) -> Footprint:
    """`projection_bytes`: a streamed build's bytes per projection weight (`PROJECTION_BYTES`);
    `calibration_tokens`: the tokens a streamed calibrated method walks through the model."""
    cost = COSTS[build]
    calibration = calibration_bytes(checkpoint, calibration_tokens) if calibration_tokens else 0
    seconds = cost.seconds(checkpoint) + (calibration_seconds(checkpoint, calibration_tokens) if calibration_tokens else 0.0)
    return Footprint(checkpoint, build, cost.peak(checkpoint, projection_bytes) + calibration, seconds, available_memory(),
                     projection_bytes, calibration)


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (children not counted)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def return_freed_memory() -> None:
    """Make glibc give every allocation of 1 MB or more back to the kernel when it is freed.

    A streamed compile reads one weight at a time; by default glibc raises its mmap threshold
    after the first large free, keeps later weights of up to 32 MB on its heap, and holds on to
    that memory after they are freed (gigabytes over a real-sized model). Not glibc: no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except OSError:
        pass


def trim_freed_memory() -> None:
    """Give the kernel back what glibc's heap holds free (`malloc_trim`): the export's freed
    graphs, before ONNX Runtime loads the artifact. Not glibc: no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


#: glibc's `mallopt` parameter number of the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3


def streamed_projections(plan: Any) -> str | None:
    """How a streamed compile stores the projections ("int4", "int8", "fp32"), or None when
    `plan` does not stream. A compile streams, its model loaded with the Linear weights
    deferred (`compiler/model/deferred.py`), when it is a Hugging Face decoder compiled into
    one decode target whose pipeline reads and rewrites each weight where it is used: prune
    steps that zero weights in place a weight at a time (magnitude per layer, nm, or wanda and
    sparsegpt calibrated by a walk through the graph a layer at a time, `passes/calibration.py`;
    the pruned weights wait in a spill file), then at most one quantize step, round-to-nearest
    or calibrated (`gptq`, `awq`). Not streamed: global magnitude, static activation scales,
    `smooth`, a `fallback` search, and gptq's `compensate`, which keeps a float copy of the graph."""
    onnx = plan.target("onnx")
    if plan.model.kind != "hf" or onnx is None or onnx.options.decode is None or len(plan.targets) != 1:
        return None
    steps = list(plan.pipeline)
    quantize = steps.pop() if steps and steps[-1].name == "quantize" else None
    if not all(step.name == "prune" and step.options.streams for step in steps):
        return None
    if quantize is None:
        return "fp32"
    options = quantize.options
    if options.smooth is not None or options.mode == "static" or getattr(options, "fallback", None) or options.compensate:
        return None
    return options.scheme


def calibration_tokens(plan: Any) -> int:
    """The tokens the plan's calibrated steps (a quantize method other than rtn, wanda or
    sparsegpt pruning) walk through the model (0: none): samples times the window of `stdlib`
    samples (a text file's lines are taken as long)."""
    from planc.compiler.textdata import STDLIB_WINDOW

    def calibrated(step: Any) -> bool:
        if step.name == "quantize":
            return step.options.method != "rtn"
        return step.name == "prune" and step.options.calibration is not None

    return sum(step.options.calibration_samples * STDLIB_WINDOW for step in plan.pipeline if calibrated(step))


def streams_weights(plan: Any) -> bool:
    """Whether `plan`'s compile streams its weights (`streamed_projections`)."""
    return streamed_projections(plan) is not None


def plan_footprint(plan: Any) -> Footprint | None:
    """The prediction for compiling `plan` (an `ir.Plan`) into an ONNX artifact, or None when
    its weights cannot be read before loading (a factory, a config-only directory) or it builds
    no ONNX artifact (a training program runs in its own processes)."""
    from planc.compiler.model_source import ModelSourceError, hf_source_directory

    onnx = plan.target("onnx")
    if plan.model.kind != "hf" or onnx is None:
        return None
    try:
        checkpoint = read_checkpoint(hf_source_directory(plan.model))
    except (ModelSourceError, OSError, ValueError):
        return None  # a missing or broken directory is reported when the model loads
    if checkpoint is None:
        return None
    projections = streamed_projections(plan)
    if projections is not None:
        footprint = predict(checkpoint, "streamed", PROJECTION_BYTES[projections], calibration_tokens(plan))
        if any(step.name == "prune" for step in plan.pipeline):  # the pruned weights wait in a spill file
            footprint = replace(footprint, spill_bytes=4 * checkpoint.projection_params, spill_free_bytes=spill_room())
        return footprint
    return predict(checkpoint, "decoder" if onnx.options.decode is not None else "encoder")


def fit_notes(footprint: Footprint) -> tuple[str, ...]:
    """What a user can change when a compile does not fit."""
    streamed = footprint.projection_bytes
    weights = (f"what a streamed compile holds ({footprint.checkpoint.streamed_bytes(streamed) / GB:.1f} GB: the projections at "
               f"{streamed:g} bytes per weight, the rest in fp32)" if streamed is not None
               else f"the model's fp32 bytes ({footprint.checkpoint.fp32_bytes / GB:.1f} GB)")
    calibration = (f" + {footprint.calibration_bytes / GB:.1f} GB for the calibrated method (the widest input's Hessian, "
                   f"{footprint.checkpoint.widest_input} wide, its factorization and the calibration activations)"
                   if footprint.calibration_bytes else "")
    notes = [
        f"the prediction is {COSTS[footprint.build].per_fp32_byte:g} x {weights} + {COSTS[footprint.build].fixed_bytes / GB:.1f} GB"
        f"{calibration}, from the checkpoint's headers",
    ]
    if footprint.calibration_bytes:
        notes.append("methods without calibration (quantize method = rtn, prune method = magnitude or nm) need about "
                     f"{(footprint.peak_bytes - footprint.calibration_bytes) / GB:.1f} GB")
    notes.append("compile on a machine with more free memory, or a smaller model; close other programs first "
                 "(PLANC_AVAILABLE_MEMORY=BYTES overrides the memory planc assumes is free)")
    return tuple(notes)
