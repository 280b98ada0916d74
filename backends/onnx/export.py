"""torch -> ONNX: export a (transformed) fx GraphModule or an eager model with the dynamo exporter.

planc's quantized ops are lowered by `lowering.translation_table()`; batch and sequence axes
stay dynamic (the `torch.export.Dim`s of the front end); graphs too large for one protobuf keep
their weights in `<name>.data` next to the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from torch.utils import _pytree as pytree

from planc.backends.onnx.lowering import translation_table

logger = logging.getLogger(__name__)

#: Weights past this go to an external data file: protobuf cannot hold more than 2 GiB, and
#: writing tensors straight to a file is far faster than serializing them into the message (an
#: 0.8 GB int4 1B decoder: 0.3-0.6 s against 6.5-7.7 s). Smaller models stay one file.
EXTERNAL_DATA_THRESHOLD = 256 << 20


class ExportError(Exception):
    """The graph could not be exported to ONNX; the message names the op or the reason."""


def output_names(outputs: Any) -> list[str]:
    """Names of a model's output tensors in pytree order: dict / ModelOutput keys, else output_{i}."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names: list[str] = []
    for index, (path, leaf) in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        last = keys[-1] if keys and isinstance(keys[-1], str) else None
        name = last if last and last not in names else f"output_{index}"
        names.append(name)
    return names


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and known-harmless warnings (torchvision missing...)."""
    noisy = [logging.getLogger(name) for name in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(noisy, levels):
            log.setLevel(level)


def export_model(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    dynamic_shapes: dict[str, Any] | None,
    opset: int = 18,
) -> ir.Model:
    """The ONNX graph of `module(**inputs)`, planc ops lowered, as an in-memory `onnx_ir` model."""
    with torch.no_grad():
        names = output_names(module(**inputs))
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                (),
                kwargs=dict(inputs),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=list(inputs),
                output_names=names,
                opset_version=opset,
                custom_translation_table=translation_table(),
                verbose=False,
                report=False,
            )
    except Exception as error:  # the exporter raises many types; all mean "cannot export"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {first}") from error
    if program is None or program.model is None:
        raise ExportError("torch.onnx.export returned no model")
    return program.model


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: Path) -> list[Path]:
    """Write `model` to `path` (weights in `path.data` when large); returns the files written."""
    path = Path(path)
    data_name = path.name + ".data"
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=data_name)
        return [path, path.with_name(data_name)]
    ir.save(model, path)
    return [path]


def model_files(path: Path) -> list[Path]:
    """`path` and its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])


def files_size(path: Path) -> int:
    """Bytes on disk of an ONNX model and its external data."""
    return sum(os.path.getsize(p) for p in model_files(Path(path)))
