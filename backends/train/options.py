"""Options of `target train { ... }`, importable without torch."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Optimizer(_Frozen):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    momentum: float = Field(0.9, ge=0)


class Schedule(_Frozen):
    warmup: int = Field(10, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class Data(_Frozen):
    """Local text: a file, a folder of files, or `stdlib` (the Python standard library's sources)."""

    path: str = "stdlib"
    #: File name glob inside a folder.
    glob: str = "*.py"
    #: bytes = byte-level ids (0..255); model = the Hugging Face model's own tokenizer files.
    tokenizer: Literal["bytes", "model"] = "bytes"
    seq_len: int = Field(128, ge=8)
    #: Cap on the corpus size read from disk, in bytes.
    max_bytes: int = Field(4_000_000, ge=1024)
    #: Fraction held out for evaluation (never trained on).
    heldout: float = Field(0.02, ge=0, lt=0.5)


class Distill(_Frozen):
    """Knowledge distillation from the original (uncompressed) model."""

    teacher: Literal["original"] = "original"
    temperature: float = Field(2.0, gt=0)
    #: Weight of the distillation loss; (1 - alpha) weighs the task loss.
    alpha: float = Field(0.5, ge=0, le=1)
    losses: list[Literal["logits", "embedding", "hidden", "attention"]] = Field(
        default_factory=lambda: ["logits"]
    )
    #: Student layer -> teacher layer for hidden/attention losses, e.g. [[0, 1], [1, 3]].
    layer_map: list[list[int]] = Field(default_factory=list)


class Checkpoint(_Frozen):
    every: int = Field(50, ge=1)
    dir: str = "checkpoints"
    resume: bool = True
    keep: int = Field(2, ge=1)


class PipelineSchedule(_Frozen):
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    #: Chunks each micro-batch is split into as it flows through the stages.
    microbatches: int = Field(4, ge=1)
    #: Number of stages. None: the plan's partition pass decides, else every process is a stage.
    stages: int | None = Field(None, ge=2)


class TrainTarget(_Frozen):
    """`target train`: emit a standalone torchrun program."""

    kind: ClassVar[str] = "train"
    strategy: list[Literal["ddp", "fsdp", "pipeline", "tensor"]] = Field(default_factory=lambda: ["ddp"])
    world_size: int = Field(2, ge=1)
    nodes: int = Field(1, ge=1)
    rdzv_endpoint: str = "localhost:29500"
    max_restarts: int = Field(0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_scaling: Literal["dynamic", "none"] = "dynamic"
    micro_batch: int = Field(8, ge=1)
    accumulation: int = Field(1, ge=1)
    #: If given, must equal micro_batch x accumulation x data-parallel size.
    global_batch: int | None = Field(None, ge=1)
    activation_checkpointing: bool = False
    grad_clip: float | None = Field(1.0, gt=0)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    data: Data = Field(default_factory=Data)
    steps: int = Field(100, ge=1)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    distill: Distill | None = None
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    pipeline: PipelineSchedule = Field(default_factory=PipelineSchedule)
    #: Size of each tensor-parallel group. None: all processes when `tensor` is the only strategy.
    tensor_parallel: int | None = Field(None, ge=1)
    #: Held-out sequences evaluated before and after training (split over the data-parallel ranks).
    eval_sequences: int = Field(256, ge=1)
    #: Fraction of the steps over which `prune ... schedule = gradual` ramps sparsity up.
    sparsity_ramp: float = Field(0.5, gt=0, le=1)
    #: Where the generated program writes the trained weights (relative to the output dir).
    save: str = "trained.pt"

    @model_validator(mode="after")
    def _strategy_is_consistent(self) -> TrainTarget:
        if len(set(self.strategy)) != len(self.strategy):
            raise ValueError("strategy lists a parallelism twice")
        if "ddp" in self.strategy and "fsdp" in self.strategy:
            raise ValueError("ddp and fsdp both shard the data dimension: pick one")
        if self.world_size % self.nodes:
            raise ValueError(f"world_size {self.world_size} is not a multiple of nodes {self.nodes}")
        return self

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nodes
