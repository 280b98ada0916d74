"""The quantize pass, one class per method (the registry picks it from `Quantize.implementation()`):

- `rtn`: round-to-nearest, and the rewrite into integer ops every method shares (`rtn.py`);
- `gptq`: error-compensating rounding on the layer inputs' Hessian (`gptq.py`);
- `awq`: activation-aware input scaling with a searched strength (`awq.py`).

The stored integer layouts live in `weights.py` (formats of `passes/qops.py`); the calibration
captures in `passes/calibration.py`.

This module is the pass's option model (torch-free, so `planc check` stays light).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from planc.passes.options import PassOptions

#: GPTQ's default dampening (the paper's 1% of the mean Hessian diagonal).
GPTQ_DAMP = 0.01
#: Share of the verify goal's error budget the `fallback` search keeps in reserve (see
#: `compiler/mixed_precision.py`): the search checks its candidates on calibration samples they
#: were neither built nor ranked on, but the held-out text the gate scores may be harder.
FALLBACK_MARGIN = 0.25
#: Fewest calibration samples the `fallback` search can split (one to rank, at least one per fold).
FALLBACK_MIN_SAMPLES = 4


class Quantize(PassOptions):
    """Insert real integer weights (int8 / packed int4) with their scales into the graph."""

    name: ClassVar[str] = "quantize"
    impl: ClassVar[str] = "planc.passes.quantize.rtn:QuantizePass"
    #: How the integer weights are chosen (the stored layout and ops are the same for all):
    #: rtn rounds each weight to nearest; gptq (Frantar et al. 2022) rounds column by column and
    #: moves each rounding error onto the columns not yet rounded, weighted by the inverse of the
    #: layer's input Hessian, block by block on the outputs of the already quantized blocks;
    #: awq (Lin et al. 2023) scales input channels by mean|X_j|^alpha with alpha searched per
    #: input to minimize the quantized layers' output error. gptq and awq need `calibration`.
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    #: gptq: added to the Hessian's diagonal, as a fraction of its mean diagonal.
    damp: float = Field(GPTQ_DAMP, gt=0.0, le=1.0)
    #: gptq: round the columns of largest Hessian diagonal (most active inputs) first.
    act_order: bool = False
    #: gptq: fit each layer to the float graph's outputs from the inputs the already quantized
    #: layers give it (GPTAQ's asymmetric calibration), so it undoes part of their error instead
    #: of passing it on; costs a second capture per input on a float copy of the graph.
    compensate: bool = False
    scheme: Literal["int8", "int4"] = "int8"
    #: dynamic: activations quantized at run time; static: calibrated fixed activation scales;
    #: weight_only: weights stored as integers, dequantized for the matmul.
    mode: Literal["dynamic", "static", "weight_only"] = "dynamic"
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: int = Field(32, ge=8)
    symmetric: bool = True
    #: Text file (one sample per line) used to calibrate static activation scales and `smooth`.
    calibration: str | None = None
    calibration_samples: int = Field(32, ge=1)
    #: Activation-aware scaling strength alpha (None = off). Each Linear input channel j is divided
    #: by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (X from the calibration file, or the example
    #: inputs) and its weight column multiplied by s_j before quantization: for int8 it tames the
    #: activation outliers (SmoothQuant); for int4 it gives salient input channels finer weight steps.
    smooth: float | None = Field(None, ge=0.0, le=1.0)
    #: int4 only: the precision of the layers the plan's verify goal cannot afford at int4. The
    #: compiler measures each layer's sensitivity on the calibration data and keeps int4 for as
    #: many of the least sensitive ones as the goal allows (`compiler/mixed_precision.py`); the
    #: resolved plan spells the assignment out as one int4 and one int8 step.
    fallback: Literal["int8"] | None = None
    #: fallback: share of the goal's error budget kept in reserve while searching:
    #: `goal = ">= 0.99"` with margin 0.25 is searched as `>= 0.9925`, on calibration samples
    #: the candidates were neither fitted nor ranked on.
    margin: float = Field(FALLBACK_MARGIN, ge=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _int4_defaults(cls, data: object) -> object:
        """int4 is always weight-only and group-wise: fill those defaults instead of erroring."""
        if isinstance(data, dict) and data.get("scheme") == "int4":
            data = {"mode": "weight_only", "granularity": "per_group", **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Quantize:
        if self.scheme == "int4" and self.mode != "weight_only":
            raise ValueError("int4 is weight-only: set mode = weight_only")
        if self.granularity == "per_group" and self.mode != "weight_only":
            raise ValueError("per_group granularity is for weight-only quantization")
        if self.mode == "static" and self.calibration is None:
            raise ValueError('static quantization needs calibration data: calibration = "file.txt"')
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, got {self.group_size}")
        if self.method != "rtn" and self.calibration is None:
            raise ValueError(f'method = {self.method} calibrates on layer inputs: it needs calibration = "file.txt"')
        if self.method != "gptq" and (self.act_order or self.compensate or self.damp != GPTQ_DAMP):
            raise ValueError("damp, act_order and compensate belong to method = gptq")
        if self.fallback is not None and self.scheme != "int4":
            raise ValueError("fallback = int8 mixes int4 with int8: it belongs to scheme = int4")
        if self.margin != FALLBACK_MARGIN and self.fallback is None:
            raise ValueError("margin belongs to fallback = int8 (it tightens the goal of the mixed-precision search)")
        if self.fallback is not None and self.calibration is None:
            raise ValueError('fallback measures each layer on calibration data: it needs calibration = "file.txt"')
        if self.fallback is not None and self.calibration_samples < FALLBACK_MIN_SAMPLES:
            raise ValueError("fallback splits the calibration samples to rank and check candidates: "
                             f"calibration_samples must be at least {FALLBACK_MIN_SAMPLES}")
        if self.method == "awq" and self.smooth is not None:
            raise ValueError("method = awq searches alpha itself: drop smooth (smooth = alpha is the fixed-alpha form)")
        return self

    def implementation(self) -> str:
        """One pass class per method; rtn is the base the others reuse."""
        return {
            "rtn": "planc.passes.quantize.rtn:QuantizePass",
            "gptq": "planc.passes.quantize.gptq:GPTQPass",
            "awq": "planc.passes.quantize.awq:AWQPass",
        }[self.method]
