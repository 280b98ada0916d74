"""ONNX Runtime sessions the way planc wants them: chosen providers, fixed threads, no spinning.

- `resolve_providers`: the plan's provider names -> ORT provider names, checked against
  `onnxruntime.get_available_providers()`; `auto` is CUDA when this build has it, else CPU.
  A provider the plan names but this machine lacks is a `ProviderError`, never a silent fallback
  (and never a CUDA request on a CPU-only build, which would log errors).
- `check_dtypes`: bf16 graphs need a GPU provider; ORT's CPU provider has no bf16 kernels.
- `create_session`: every session sets `session.intra_op.allow_spinning = 0` (spinning threads
  steal the cores of whatever runs next to them) and `intra_op_num_threads` from the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

#: Plan spelling -> ONNX Runtime execution provider.
PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

#: Plan spelling -> ORT graph optimization level.
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: ORT's ERROR severity: its warnings (e.g. about nodes placed on the CPU) stay out of the log.
_LOG_ERRORS_ONLY = 3


class ProviderError(Exception):
    """The plan asks for an execution provider or dtype this machine cannot run."""


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """ORT provider names for the plan's `providers` list, in order, CPU always last."""
    available = list(available) if available is not None else available_providers()
    resolved: list[str] = []
    for name in requested or ["auto"]:
        if name == "auto":
            chosen = PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
        else:
            chosen = PROVIDERS[name]
            if chosen not in available:
                usable = ", ".join(k for k, v in PROVIDERS.items() if v in available)
                raise ProviderError(
                    f"execution provider '{name}' ({chosen}) is not available in this onnxruntime "
                    f"build (available: {usable or 'none'}); use providers = [auto] or install "
                    "onnxruntime-gpu on a machine with a GPU"
                )
        if chosen not in resolved:
            resolved.append(chosen)
    if PROVIDERS["cpu"] not in resolved:
        resolved.append(PROVIDERS["cpu"])
    return resolved


def check_dtypes(element_types: set[str], providers: Sequence[str]) -> None:
    """Raise if the graph holds bf16 tensors and only the CPU provider would run them."""
    if "BFLOAT16" in element_types and list(providers) == [PROVIDERS["cpu"]]:
        raise ProviderError(
            "bf16 is not supported by ONNX Runtime's CPU execution provider; cast to fp16 "
            "(cast { dtype = fp16 }) or run on providers = [cuda]"
        )


def session_options(
    threads: int, level: str = "all", optimized_path: Path | None = None, external_data: bool = False
) -> ort.SessionOptions:
    """Options of every planc session; `optimized_path` makes ORT save its optimized graph there
    (weights in `<name>.data` with `external_data`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = _LOG_ERRORS_ONLY
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        if external_data:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", Path(optimized_path).name + ".data"
            )
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return options


def create_session(
    model: Path | str | bytes,
    providers: Sequence[str],
    threads: int,
    level: str = "all",
    optimized_path: Path | None = None,
    external_data: bool = False,
    disabled_optimizers: Sequence[str] = (),
) -> ort.InferenceSession:
    """An InferenceSession on `providers`; with `optimized_path`, ORT also saves its optimized graph
    (`disabled_optimizers`: ORT graph transformers to skip, by name)."""
    options = session_options(threads, level, optimized_path, external_data)
    source = model if isinstance(model, bytes) else str(model)
    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    try:
        return ort.InferenceSession(source, options, providers=list(providers), **extra)
    except Exception as error:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProviderError(f"ONNX Runtime cannot load the model on {', '.join(providers)}: {text}") from error


_NUMPY_TYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
}


def feeds_for(session: ort.InferenceSession, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The session's inputs from `inputs` (numpy or torch), cast to the dtypes the graph declares."""
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in inputs:
            raise KeyError(f"the model needs input '{spec.name}' (given: {', '.join(inputs)})")
        value = inputs[spec.name]
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        dtype = _NUMPY_TYPES.get(spec.type)
        feeds[spec.name] = array.astype(dtype, copy=False) if dtype is not None else array
    return feeds


def run(session: ort.InferenceSession, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Outputs by name for one call."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds_for(session, inputs))))
