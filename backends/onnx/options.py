"""Options of `target onnx { ... }`, importable without torch or onnxruntime."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from planc.passes.cpu import CPU_NAMES

#: `cpu = ...`: a CPU family (`passes/cpu.py`), or `auto`, this machine's.
CpuChoice = Literal[("auto", *CPU_NAMES)]  # type: ignore[valid-type]

_GOAL = re.compile(r"^\s*(>=|<=|>|<|==)\s*(-?\d+(\.\d*)?([eE][-+]?\d+)?)\s*$")
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
}

#: The goal of a plan that names none, per metric: loose enough for int8 and int4 weights of a
#: trained model, tight enough that a broken export (or a ruinous technique) fails the compile.
#: `perplexity_delta` is relative: (ppl of the artifact - ppl of the original) / ppl of the original.
DEFAULT_GOALS: dict[str, str] = {
    "cosine": ">= 0.99",
    "max_abs": "<= 0.05",
    "top1": ">= 0.9",
    "perplexity_delta": "<= 0.05",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class Verify(_Frozen):
    """How the artifact is checked against the eager model before it is published."""

    #: Options whose `none` is a value, not their absence (`planc explain` prints it).
    none_is_a_value: ClassVar[frozenset[str]] = frozenset({"goal"})

    #: Default `cosine`; `top1` in a target with `decode { }` (see `OnnxTarget`).
    metric: Literal["cosine", "max_abs", "top1", "perplexity_delta"] = "cosine"
    #: A comparison such as ">= 0.99"; a failing goal fails the compile. Unset: the metric's
    #: `DEFAULT_GOALS` entry; `goal = none`: publish unverified (the report, the CLI and
    #: `planc bench` say so).
    goal: str | None = None
    #: Text file, one sample per line (tokenized with the model's tokenizer); None = random ids
    #: from the declared input shapes.
    data: str | None = None
    #: Samples read from `data` (None = every line: a goal met on a lucky few is no goal met).
    samples: int | None = Field(None, ge=1)
    #: Time allowed for scoring every sample: a goal is judged on all of them, so running out
    #: fails the compile (with how many were scored); without a goal the report says scored/available.
    max_seconds: float = Field(300.0, gt=0)

    @field_validator("goal")
    @classmethod
    def _goal_is_comparison(cls, goal: str | None) -> str | None:
        if goal is not None and not _GOAL.match(goal):
            raise ValueError(f"goal must look like '>= 0.99' (or be none), got {goal!r}")
        return goal

    @property
    def judged_goal(self) -> str | None:
        """The goal the artifact is held to: the plan's, else the metric's default; None for `goal = none`."""
        if self.unverified:
            return None
        return self.goal if self.goal is not None else DEFAULT_GOALS[self.metric]

    @property
    def unverified(self) -> bool:
        """The plan asked to publish without a goal (`goal = none`: set, to None)."""
        return self.goal is None and "goal" in self.model_fields_set

    def goal_parts(self) -> tuple[str, float] | None:
        """The judged goal split into (operator, threshold); None for `goal = none`."""
        goal = self.judged_goal
        if goal is None:
            return None
        match = _GOAL.match(goal)
        assert match is not None
        return match.group(1), float(match.group(2))

    def met(self, value: float) -> bool | None:
        """Whether `value` meets the judged goal (None for `goal = none`; never for NaN)."""
        parts = self.goal_parts()
        if parts is None:
            return None
        op, threshold = parts
        return bool(_OPERATORS[op](value, threshold)) and not math.isnan(value)


class Bench(_Frozen):
    """Shape and protocol of the latency measurement in the report."""

    batch: int = Field(1, ge=1)
    seq: int = Field(128, ge=1)
    threads: int = Field(2, ge=1)
    runs: int = Field(30, ge=3)


class Decode(_Frozen):
    """Serve a decoder LM: export with a key/value cache and check generation."""

    prompts: list[str] = Field(default_factory=lambda: ["def main(", "import os\n"])
    max_new_tokens: int = Field(16, ge=1)
    #: Held-out text for perplexity, one document per file; None = skip perplexity.
    heldout: str | None = None
    #: A smaller decoder artifact directory (relative to the plan, built by its own plan first:
    #: layer-dropped and distilled) that speculates for this one (`decoder/speculative.py`); the report
    #: then gives its acceptance rate and tokens/s against plain decoding, and the build fails
    #: unless speculation reproduces plain greedy decoding token for token.
    draft: str | None = None
    #: Tokens the draft proposes per verification call of the full model.
    draft_tokens: int = Field(4, ge=1, le=32)


class OnnxTarget(_Frozen):
    """`target onnx`: export the optimized graph and run it on ONNX Runtime."""

    kind: ClassVar[str] = "onnx"
    opset: int = Field(18, ge=17, le=23)
    #: Execution providers in order of preference; `auto` = CUDA when present, else CPU.
    providers: list[Literal["auto", "cuda", "tensorrt", "cpu"]] = Field(default_factory=lambda: ["auto"])
    optimization: Literal["disabled", "basic", "extended", "all"] = "all"
    #: Apply ONNX Runtime's transformer fusions (Attention, SkipLayerNorm, BiasGelu, ...).
    fusions: bool = True
    #: The CPU the artifact will run on (`passes/cpu.py`): it decides the int8 weight format that
    #: ONNX Runtime sums exactly there. `auto` = the compiling machine.
    cpu: CpuChoice = "auto"
    #: How ONNX Runtime multiplies int4 weights (`backends/onnx/int4_compute.py`): `fp32`, or
    #: `int8` activations inside the kernel (faster, a little less exact); `auto` builds both and
    #: keeps the faster one that meets the verify goal.
    int4_compute: Literal["auto", "fp32", "int8"] = "auto"
    #: Store the quantized embedding table too (int8, or int4 when the plan quantizes to int4).
    quantize_embeddings: bool = False
    verify: Verify = Field(default_factory=Verify)
    bench: Bench = Field(default_factory=Bench)
    decode: Decode | None = None

    @model_validator(mode="after")
    def _decoders_default_to_top1(self) -> OnnxTarget:
        """A decoder is verified by next-token agreement, not sentence-embedding cosine: a decode
        target that names no metric gets `top1`, so `decode { }` alone compiles."""
        if self.decode is not None and "metric" not in self.verify.model_fields_set:
            verify = Verify(**{**self.verify.model_dump(exclude_unset=True), "metric": "top1"})
            object.__setattr__(self, "verify", verify)
        return self
