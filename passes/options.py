"""Option models of every graph pass, importable without torch.

A pass *is* its options: each class below is a frozen pydantic model whose `name` is spelled
exactly as in `.plan` files. `planc check` validates a plan against these models without
loading torch; the implementations in `passes/<name>.py` receive an instance of them.
Unknown or ill-typed options are rejected by the model itself, and the compiler maps the
error back to the option's span in the plan.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


#: Every pass known to planc, by the name plans use: each option model below registers itself.
PASS_OPTIONS: dict[str, type[PassOptions]] = {}


class PassOptions(BaseModel):
    """Base of all pass option models: frozen, no unknown fields."""

    # defer_build: a plan validates only the passes it uses; `planc check` skips building the rest.
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    name: ClassVar[str]
    #: "module:Class" of the GraphPass implementing these options: the one place a pass is
    #: wired to its code (imported only when a graph is touched, so `planc check` stays light).
    impl: ClassVar[str]
    #: Module types the pass acts on when the plan gives no selector.
    default_types: ClassVar[tuple[str, ...]] = ("Linear",)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            PASS_OPTIONS[cls.name] = cls

    def implementation(self) -> str:
        """The "module:Class" for these option values (a pass with several methods picks one)."""
        return self.impl


class Prune(PassOptions):
    """Remove weights: unstructured magnitude, N:M semi-structured, calibrated (wanda,
    sparsegpt), whole heads/channels, or whole repeated blocks (layers)."""

    name: ClassVar[str] = "prune"
    impl: ClassVar[str] = "planc.passes.prune:PrunePass"
    #: wanda: |W_ij| * ||X_j||_2 per output row (Sun et al. 2023); sparsegpt: Hessian-based mask
    #: with an OBS update of the kept weights (Frantar & Alistarh 2023). Both calibrate block by
    #: block on `calibration`, each block reading the outputs of the already pruned ones.
    method: Literal["magnitude", "nm", "heads", "channels", "layers", "wanda", "sparsegpt"] = "magnitude"
    #: Fraction removed: of weights (magnitude; wanda/sparsegpt: of each output row), of heads
    #: (heads) or of MLP channels (channels).
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    #: N:M pattern: keep `n` of every `m` consecutive weights along the input dimension.
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)
    #: wanda / sparsegpt: `unstructured` removes `sparsity` of each output row; `nm` keeps `n` of
    #: every `m` consecutive weights (like method = nm, chosen by the method's score).
    structure: Literal["unstructured", "nm"] = "unstructured"
    #: wanda / sparsegpt: text file (one sample per line) the layer inputs are measured on.
    calibration: str | None = None
    calibration_samples: int = Field(32, ge=1)
    #: Magnitude threshold per layer (local) or one threshold over all selected layers (global).
    scope: Literal["local", "global"] = "local"
    #: Importance of a head or channel for structured pruning: the l1/l2 norm of its weights, or
    #: `activation`, the energy of its contribution to the block's output on the training text
    #: (measured by the training program: needs `target train`).
    importance: Literal["l1", "l2", "activation"] = "l2"
    #: Heads/channels: after the cut, refit the projection reading the kept ones (out-projection,
    #: down-projection) by least squares, so the block's output on the training text stays as
    #: close to the original's as the kept ones allow (training program: needs `target train`).
    reconstruct: bool = False
    #: oneshot prunes at compile time; gradual ramps sparsity during training (train target).
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    #: method = layers: indices of the repeated blocks to keep (0-based, as in `layers(...)`);
    #: every other selected block is removed and its input flows to the next block.
    keep: list[int] | None = None

    @model_validator(mode="after")
    def _pattern_is_valid(self) -> Prune:
        if (self.method == "nm" or self.structure == "nm") and self.n >= self.m:
            raise ValueError(f"N:M pruning needs n < m, got {self.n}:{self.m}")
        if self.method in ("wanda", "sparsegpt"):
            if self.calibration is None:
                raise ValueError(f'method = {self.method} measures layer inputs: it needs calibration = "file.txt"')
            if self.schedule == "gradual":
                raise ValueError(f"method = {self.method} prunes at compile time: use schedule = oneshot")
        elif self.structure != "unstructured" or self.calibration is not None:
            raise ValueError("structure and calibration belong to method = wanda or sparsegpt")
        if self.method == "layers":
            if not self.keep:
                raise ValueError("method = layers needs the blocks to keep, e.g. keep = [1, 3, 5]")
            if min(self.keep) < 0 or len(set(self.keep)) != len(self.keep):
                raise ValueError(f"keep lists block indices, each once and >= 0; got {self.keep}")
            if self.schedule == "gradual":
                raise ValueError("method = layers removes whole blocks at once: use schedule = oneshot")
        elif self.keep is not None:
            raise ValueError("keep = [...] belongs to method = layers")
        if self.method not in ("heads", "channels") and (self.reconstruct or self.importance == "activation"):
            raise ValueError("reconstruct and importance = activation belong to method = heads or channels")
        return self

    def implementation(self) -> str:
        """One pass class per method, e.g. "planc.passes.prune.heads:HeadsPass"."""
        return {
            "magnitude": "planc.passes.prune.magnitude:MagnitudePass",
            "nm": "planc.passes.prune.nm:NMPass",
            "heads": "planc.passes.prune.heads:HeadsPass",
            "channels": "planc.passes.prune.channels:ChannelsPass",
            "layers": "planc.passes.prune.layers:LayersPass",
            "wanda": "planc.passes.prune.wanda:WandaPass",
            "sparsegpt": "planc.passes.prune.sparsegpt:SparseGPTPass",
        }[self.method]

    @property
    def measures_activations(self) -> bool:
        """Whether the step needs activations on real text (only the training program has them)."""
        return self.importance == "activation" or self.reconstruct


class LowRank(PassOptions):
    """Factor a Linear W (out x in) into two Linears of rank r via truncated SVD."""

    name: ClassVar[str] = "lowrank"
    impl: ClassVar[str] = "planc.passes.lowrank:LowRankPass"
    rank: int | None = Field(None, ge=1)
    #: Keep the smallest rank whose singular values hold this fraction of the energy (sum s^2).
    energy: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_of_rank_or_energy(self) -> LowRank:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("lowrank needs exactly one of 'rank' or 'energy'")
        return self


#: GPTQ's default dampening (the paper's 1% of the mean Hessian diagonal).
GPTQ_DAMP = 0.01


class Quantize(PassOptions):
    """Insert real integer weights (int8 / packed int4) with their scales into the graph."""

    name: ClassVar[str] = "quantize"
    impl: ClassVar[str] = "planc.passes.quantize:QuantizePass"
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
        if self.method != "gptq" and (self.act_order or self.damp != GPTQ_DAMP):
            raise ValueError("damp and act_order belong to method = gptq")
        if self.fallback is not None and self.scheme != "int4":
            raise ValueError("fallback = int8 mixes int4 with int8: it belongs to scheme = int4")
        if self.fallback is not None and self.calibration is None:
            raise ValueError('fallback measures each layer on calibration data: it needs calibration = "file.txt"')
        if self.method == "awq" and self.smooth is not None:
            raise ValueError("method = awq searches alpha itself: drop smooth (smooth = alpha is the fixed-alpha form)")
        return self

    def implementation(self) -> str:
        """One pass class per method; rtn is the base the others reuse."""
        return {
            "rtn": "planc.passes.quantize:QuantizePass",
            "gptq": "planc.passes.quantize.gptq:GPTQPass",
            "awq": "planc.passes.quantize.awq:AWQPass",
        }[self.method]


class Cast(PassOptions):
    """Run the selected part of the model in fp16/bf16, keeping numerically fragile ops in fp32."""

    name: ClassVar[str] = "cast"
    impl: ClassVar[str] = "planc.passes.cast:CastPass"
    default_types: ClassVar[tuple[str, ...]] = ()  # no selector: the whole model
    dtype: Literal["fp16", "bf16"] = "fp16"
    #: Op kinds kept in fp32; casts are inserted only at the boundaries.
    keep_fp32: list[Literal["layernorm", "softmax", "embedding", "loss", "pooling"]] = Field(
        default_factory=lambda: ["layernorm", "softmax"]
    )


class Partition(PassOptions):
    """Cut the model into pipeline stages of balanced cost with torch.fx's split_module."""

    name: ClassVar[str] = "partition"
    impl: ClassVar[str] = "planc.passes.partition:PartitionPass"
    default_types: ClassVar[tuple[str, ...]] = ()
    stages: int = Field(2, ge=2)
    balance: Literal["params", "flops", "time"] = "params"
    #: Cut only between repeated blocks (transformer layers) or between any two nodes.
    boundary: Literal["blocks", "nodes"] = "blocks"


