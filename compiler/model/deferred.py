"""Projection weights read from the checkpoint where they are used, never all held at once.

A real-sized decoder does not fit this machine in fp32 (Llama-3.1-8B: 32 GB), while its int4
artifact does (5 GB). A decode target that reads each projection's weight once (an empty
pipeline, or one round-to-nearest quantize step: no calibration run through the model;
`compiler.footprint.streamed_projections`) therefore loads the model with its Linear weights
*deferred*:

- the model is built with its parameters on the meta device (buffers such as rotary tables are
  computed as usual), then every parameter gets CPU storage: the checkpoint's values for
  embeddings, norms and biases; for a deferred weight, storage that is never written (pages the
  kernel never backs, so they cost no memory) and a loader that reads it from the safetensors
  file in fp32 (`CheckpointTensors`: a file read, not a memory map);
- graph passes read weights through `graph_utils.get_tensor`, which calls the loader of a
  deferred weight (`deferred_loaders` puts them in the captured graph's `meta`), so the quantize
  pass has one fp32 weight in memory at a time;
- an export of the eager model itself (an empty pipeline) traces the never-written storage and
  binds each initializer to its loader, read when the file is written
  (`backends/onnx/decoder.py`: `bind_deferred_weights`);
- the eager model runs (the verification reference) inside `streamed(model)`: each deferred
  Linear's weight is loaded by a forward pre-hook and dropped again after its forward.

A tied embedding is loaded (its Embedding reads it), so an LM head that shares it is not deferred.
"""

from __future__ import annotations

import contextlib
import logging
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

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in fp32 (a new tensor)."""
        path, start, entry = self._where[key]
        begin, end = entry["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)  # not zeroed first, as a bytearray is
        with path.open("rb", buffering=0) as f:
            f.seek(start + begin)
            f.readinto(data.numpy())
        return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"]).to(torch.float32)


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
        deferred = all(isinstance(module, nn.Linear) and attr == "weight" for module, attr, _ in holders)
        if deferred:
            value = torch.empty(meta.shape, dtype=torch.float32)  # never written: no memory
            for dotted in names:
                loaders[dotted] = (lambda k=key: checkpoint.read(k))
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
    logger.info("%d Linear weights deferred: read from %s where used", len(loaders), directory)
    return model.eval()


def deferred_loaders(model: nn.Module, prefix: str = "") -> dict[str, Callable[[], torch.Tensor]]:
    """{dotted name (with `prefix`): loader} of the model's deferred weights ({} when none)."""
    return {prefix + name: load for name, load in getattr(model, "_planc_deferred", {}).items()}


def has_deferred_weights(model: nn.Module) -> bool:
    return bool(getattr(model, "_planc_deferred", None))


@contextlib.contextmanager
def streamed(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` eagerly with each deferred Linear weight loaded just before its forward and
    dropped right after: one weight in memory at a time (a no-op for a model with none)."""
    loaders = getattr(model, "_planc_deferred", {})
    handles = []
    for name, module in model.named_modules():
        load = loaders.get(f"{name}.weight" if name else "weight")
        if load is None or not isinstance(module, nn.Linear):
            continue
        empty = module._parameters["weight"]

        def before(mod: nn.Module, args: Any, load: Callable[[], torch.Tensor] = load) -> None:
            mod._parameters["weight"] = nn.Parameter(load(), requires_grad=False)

        def after(mod: nn.Module, args: Any, output: Any, empty: nn.Parameter = empty) -> None:
            mod._parameters["weight"] = empty

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["CheckpointUnreadable", "deferred_loaders", "has_deferred_weights", "load_deferred", "streamed"]
