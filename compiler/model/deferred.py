"""Weights read from the checkpoint where they are used, never all held at once.

A real-sized decoder does not fit this machine in fp32 (Llama-3.1-8B: 32 GB), while its int4
artifact does (5 GB). A decode target that reads each projection's weight where it is used (in-place
pruning, then round-to-nearest, or gptq / awq calibrated by a walk through the graph a layer at
a time; `compiler.footprint.streamed_projections`) therefore loads the model with its Linear
weights and its untied token embedding *deferred*:

- the model is built with its parameters on the meta device (buffers such as rotary tables are
  computed as usual), then every parameter gets CPU storage: the checkpoint's values for norms,
  biases and a tied embedding; for a deferred weight, storage that is never written (pages the
  kernel never backs, so they cost no memory) and a loader (`DeferredWeight`) that reads it, or
  some of its rows, from the safetensors file in fp32 (`CheckpointTensors`: file reads, not a
  memory map);
- graph passes read weights through `graph_utils.get_tensor`, which calls the loader of a
  deferred weight (`deferred_loaders` puts them in the captured graph's `meta`), so a pass has
  one fp32 weight in memory at a time (`passes/calibration.py`'s walk too); a pass that rewrites
  one (`graph_utils.set_tensor`: pruning) writes it to a `SpillFile` and its loader reads it back;
- the export traces the never-written storage and binds each initializer still read from it to
  its loader, read when the file is written (`backends/onnx/decoder/exporter.py`: `bind_deferred_weights`);
- the eager model runs (the verification reference) inside `streamed(model)`: a deferred
  Linear's weight is loaded just before its forward and dropped after it (an LM head block of
  rows at a time); an Embedding reads the rows of the looked-up tokens only.

A tied embedding is loaded (its Embedding reads it), so an LM head that shares it is not deferred.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class CheckpointUnreadable(Exception):
    """The checkpoint's tensor names do not match the model's: load it the usual way instead."""


#: torch dtypes of the safetensors dtype names.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointTensors:
    """The tensors of a directory's safetensors files, each read on its own.

    Read with plain file reads, not a memory map: pages of a mapped file that were read count
    in the process's resident memory until the kernel reclaims them (the whole 16 GB of an 8B
    checkpoint by the end of a compile), while a read goes through the page cache and leaves
    only the one tensor in the process."""

    def __init__(self, directory: Path):
        from planc.compiler.footprint import read_header, safetensors_files

        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in safetensors_files(directory):
            with path.open("rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")  # data follow the 8-byte length and the header
            for key, entry in read_header(path).items():
                self._where[key] = (path, start, entry)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def read(self, key: str, buffers: ReadBuffers | None = None) -> torch.Tensor:
        """The tensor `key` in fp32: a new tensor, or a view of `buffers` (valid until their next read)."""
        path, start, entry = self._where[key]
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        data = torch.empty(end - begin, dtype=torch.uint8) if buffers is None else buffers.raw(end - begin)
        with path.open("rb", buffering=0) as f:  # torch.empty is not zeroed first, as a bytearray is
            f.seek(start + begin)
            f.readinto(data.numpy())
        stored = data.view(dtype).reshape(shape)
        return stored.to(torch.float32) if buffers is None else buffers.values(shape).copy_(stored)

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (indices along the first axis) of the tensor `key`, in fp32 [len(rows), ...]:
        each row is contiguous in the file, so only those bytes are read."""
        path, start, entry = self._where[key]
        with path.open("rb", buffering=0) as f:
            return _read_rows(f, start + entry["data_offsets"][0], DTYPES[entry["dtype"]], entry["shape"], rows)


def _read_rows(f: Any, offset: int, dtype: torch.dtype, shape: list[int], rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the [shape] tensor of `dtype` stored at `offset` of the open file `f`, in
    fp32: one read per run of consecutive rows."""
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    data = torch.empty(len(rows), row_bytes, dtype=torch.uint8)
    buffer = data.numpy()
    wanted = rows.tolist()
    i = 0
    while i < len(wanted):
        j = i + 1
        while j < len(wanted) and wanted[j] == wanted[j - 1] + 1:
            j += 1
        f.seek(offset + wanted[i] * row_bytes)
        f.readinto(buffer[i:j])
        i = j
    return data.view(dtype).reshape(len(rows), *shape[1:]).to(torch.float32)


class ReadBuffers:
    """Memory that reads reuse: the file's bytes and their fp32 values, grown to the largest
    tensor read. A fresh tensor per read costs more than the read itself: memory of 1 MB or more
    comes from the kernel (`footprint.return_freed_memory`), which must fault in and zero every
    page (a 1B model's weights: 2.6 s a pass, against 0.6 s into reused buffers)."""

    def __init__(self) -> None:
        self._raw = torch.empty(0, dtype=torch.uint8)
        self._values = torch.empty(0, dtype=torch.float32)

    def raw(self, nbytes: int) -> torch.Tensor:
        if self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8)
        return self._raw[:nbytes]

    def values(self, shape: list[int]) -> torch.Tensor:
        count = math.prod(shape)
        if self._values.numel() < count:
            self._values = torch.empty(count, dtype=torch.float32)
        return self._values[:count].view(shape)


class SpillFile:
    """Deferred weights that a pass edited (pruned, updated), kept in fp32 in an unnamed
    temporary file instead of memory, read back like checkpoint tensors: a streamed compile
    that prunes holds one edited weight at a time, as it holds one read weight. The file goes
    when the last weight read from it does."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="planc-spill-")
        self._where: dict[str, tuple[int, list[int]]] = {}
        self._end = 0

    def __deepcopy__(self, memo: dict) -> SpillFile:
        return self  # a copied graph reads the same stored weights (entries are never rewritten)

    def store(self, value: torch.Tensor) -> DeferredWeight:
        """Write `value` (as fp32) and return the loader that reads it back."""
        data = value.detach().to(torch.float32).contiguous()
        key = str(len(self._where))
        self._file.seek(self._end)
        self._file.write(data.numpy().data)
        self._where[key] = (self._end, list(data.shape))
        self._end += data.nbytes
        return DeferredWeight(self, key)

    def read(self, key: str, buffers: ReadBuffers | None = None) -> torch.Tensor:
        offset, shape = self._where[key]
        data = torch.empty(shape, dtype=torch.float32) if buffers is None else buffers.values(shape)
        self._file.seek(offset)
        self._file.readinto(data.numpy().data.cast("B"))
        return data

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        offset, shape = self._where[key]
        return _read_rows(self._file, offset, torch.float32, shape, rows)


class DeferredWeight:
    """A weight left in its checkpoint (or a `SpillFile`): called, it reads the whole tensor
    (fp32); `rows` reads some of its rows only (an embedding's looked-up tokens, an LM head block
    by block)."""

    def __init__(self, checkpoint: CheckpointTensors | SpillFile, key: str):
        self.checkpoint, self.key = checkpoint, key

    def __call__(self, buffers: ReadBuffers | None = None) -> torch.Tensor:
        return self.checkpoint.read(self.key, buffers)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.read_rows(self.key, rows)


#: Output rows per block when the streamed eager model runs a deferred Linear this large (a
#: real-sized LM head: 128256 rows, 2.1 GB in fp32 at 8B), so only one block is in memory.
LINEAR_BLOCK_ROWS = 16384


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init work);
    buffers are still computed on the CPU (rotary frequencies are not in checkpoints)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a meta one may be tied elsewhere: keep it
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Each parameter (by identity) with every (module, attribute, dotted name) that holds it."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name, f"{prefix}.{name}" if prefix else name))
    return owners


def _deferrable(module: nn.Module, attr: str) -> type | None:
    """The kind of layer whose `attr` may stay in the checkpoint: a Linear's weight, or a plain
    Embedding's table (a subclass may scale or reshape what it looks up: loaded)."""
    if attr != "weight":
        return None
    if isinstance(module, nn.Linear):
        return nn.Linear
    return nn.Embedding if type(module) is nn.Embedding else None


def load_deferred(directory: Path, auto_class: Any, config: Any) -> nn.Module:
    """`auto_class`'s model for `config` with the weights of `directory`, Linear weights deferred
    (see the module docstring); `CheckpointUnreadable` when a parameter has no tensor of its
    name in the checkpoint (renamed keys, a .bin checkpoint): the caller loads it fully."""
    checkpoint = CheckpointTensors(directory)
    prefix = getattr(auto_class, "base_model_prefix", "") or getattr(config, "base_model_prefix", "")
    with parameters_on_meta():
        model = auto_class.from_config(config)
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for holders in _owners(model).values():
        names = [dotted for _, _, dotted in holders]
        key = next((k for n in names for k in (n, n.removeprefix(f"{prefix}.")) if k in checkpoint), None)
        if key is None:
            raise CheckpointUnreadable(f"the checkpoint has no tensor for {names[0]}")
        meta = holders[0][0]._parameters[holders[0][1]]
        kinds = {_deferrable(module, attr) for module, attr, _ in holders}
        if kinds in ({nn.Linear}, {nn.Embedding}):  # a tied table (read by both) is loaded
            value = torch.empty(meta.shape, dtype=torch.float32)  # never written: no memory
            for dotted in names:
                loaders[dotted] = DeferredWeight(checkpoint, key)
        else:
            value = checkpoint.read(key)
            if tuple(value.shape) != tuple(meta.shape):
                raise CheckpointUnreadable(f"{key} has shape {tuple(value.shape)} in the checkpoint, {tuple(meta.shape)} in the model")
        param = nn.Parameter(value, requires_grad=False)
        for module, attr, _ in holders:
            module._parameters[attr] = param
    for name, buffer in model.named_buffers():
        if name in checkpoint:
            buffer.copy_(checkpoint.read(name))
    model._planc_deferred = loaders  # type: ignore[attr-defined]
    logger.info("%d weights deferred: read from %s where used", len(loaders), directory)
    return model.eval()


#: `GraphModule.meta` key of {weight name: loader} for weights a captured graph holds only as
#: empty storage, read where used (`passes/graph_utils.get_tensor`).
DEFERRED_WEIGHTS = "planc_deferred_weights"


def deferred_loaders(model: nn.Module, prefix: str = "") -> dict[str, Callable[[], torch.Tensor]]:
    """{dotted name (with `prefix`): loader} of the model's deferred weights ({} when none)."""
    return {prefix + name: load for name, load in getattr(model, "_planc_deferred", {}).items()}


def has_deferred_weights(model: nn.Module) -> bool:
    return bool(getattr(model, "_planc_deferred", None))


def sharing_deferred(model: nn.Module, names: Any = None) -> dict[int, Any]:
    """A `copy.deepcopy` memo under which the copy shares `model`'s deferred parameters (`names`:
    by default its own loaders'; a captured graph passes its `DEFERRED_WEIGHTS`): their storage
    is never written, and copying it would cost the memory that deferring saves."""
    loaders = getattr(model, "_planc_deferred", {}) if names is None else names
    return {id(param): param for name, param in model.named_parameters(remove_duplicate=False) if name in loaders}


@contextlib.contextmanager
def streamed(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` eagerly with its deferred weights read where used and dropped right after:
    a Linear's weight loaded just before its forward (one that large, by blocks of rows); an
    Embedding's rows of the looked-up tokens only. A no-op for a model with none."""
    loaders = getattr(model, "_planc_deferred", {})
    buffers = ReadBuffers()  # one Linear's weight at a time: each read reuses the last one's memory
    handles, replaced = [], []
    for name, module in model.named_modules():
        load = loaders.get(f"{name}.weight" if name else "weight")
        if load is None:
            continue
        if type(module) is nn.Embedding:
            module.forward = functools.partial(_embedding_rows, module, load)
            replaced.append(module)
        elif type(module) is nn.Linear and module.out_features > LINEAR_BLOCK_ROWS:
            module.forward = functools.partial(_linear_by_rows, module, load)
            replaced.append(module)
        elif isinstance(module, nn.Linear):
            empty = module._parameters["weight"]

            def before(mod: nn.Module, args: Any, load: DeferredWeight = load) -> None:
                mod._parameters["weight"] = nn.Parameter(load(buffers), requires_grad=False)

            def after(mod: nn.Module, args: Any, output: Any, empty: nn.Parameter = empty) -> None:
                mod._parameters["weight"] = empty

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module in replaced:
            del module.forward  # the class's own again


def _embedding_rows(module: nn.Embedding, load: DeferredWeight, ids: torch.Tensor) -> torch.Tensor:
    """The embedding of `ids` from the rows of its distinct tokens, read from the checkpoint."""
    tokens, where = torch.unique(ids, return_inverse=True)
    return load.rows(tokens)[where]


def _linear_by_rows(module: nn.Linear, load: DeferredWeight, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` computed LINEAR_BLOCK_ROWS output features at a time."""
    out = x.new_empty(*x.shape[:-1], module.out_features)
    for start in range(0, module.out_features, LINEAR_BLOCK_ROWS):
        rows = torch.arange(start, min(start + LINEAR_BLOCK_ROWS, module.out_features))
        bias = None if module.bias is None else module.bias[rows]
        out[..., start : start + len(rows)] = nn.functional.linear(x, load.rows(rows), bias)
    return out


__all__ = ["DEFERRED_WEIGHTS", "CheckpointUnreadable", "SpillFile", "deferred_loaders", "has_deferred_weights", "load_deferred",
           "sharing_deferred", "streamed"]
