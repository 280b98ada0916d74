"""Options of `target train { ... }`, importable without torch."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


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
    """Local text: a file, a folder of files, or `stdlib` (the Python standard library's sources).

    Decoders train on packed token sequences. Encoders (distillation) train on sentences: every
    file is split into sentences of `min_words`..`max_words` words, one sample each, padded per
    batch; `stdlib` then means the standard library's docstrings, and `corpora` adds prose
    already on the machine. Nothing is downloaded.
    """

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
    #: Encoders: offline prose added to `path`: the standard library's docstrings, Python's help
    #: topics (`pydoc_data.topics`), and the documentation under /usr/share/doc.
    corpora: list[Literal["docstrings", "pydoc_topics", "system_docs"]] = Field(default_factory=list)
    #: Text files (relative to the plan) whose sentences must never be trained on, e.g. an
    #: evaluation set: they are removed from the corpus.
    exclude: list[str] = Field(default_factory=list)
    #: Encoders: sentence length bounds, in words.
    min_words: int = Field(5, ge=1)
    max_words: int = Field(60, ge=1)
    #: Encoders: altered copies of training sentences (each altered copy is a new sample whose
    #: teacher outputs are computed once, like the others'): drop ~10% of the words, swap two
    #: spans of words, or replace ~20% of the words by random words of the model's vocabulary.
    augment: list[Literal["word_dropout", "span_shuffle", "word_swap"]] = Field(default_factory=list)
    #: Fraction of the training sentences that get one copy per augmentation.
    augment_fraction: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _word_bounds(self) -> Data:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}")
        return self


class LossWeights(_Frozen):
    """Weight of each distillation term in the sum."""

    logits: float = Field(1.0, ge=0)
    embedding: float = Field(1.0, ge=0)
    hidden: float = Field(1.0, ge=0)
    attention: float = Field(1.0, ge=0)
    similarity: float = Field(1.0, ge=0)


class Distill(_Frozen):
    """Knowledge distillation from the original (uncompressed) model.

    Terms: `logits` (KL on softmax(logits / T), decoders), `embedding` (sentence embeddings:
    cosine or MSE), `hidden` (block outputs, per `layer_map`), `attention` (head-averaged
    attention maps per `layer_map`, encoders), `similarity` (the batch's matrix of pairwise
    embedding cosines, encoders).
    """

    teacher: Literal["original"] = "original"
    temperature: float = Field(2.0, gt=0)
    #: Weight of the distillation loss; (1 - alpha) weighs the task loss.
    alpha: float = Field(0.5, ge=0, le=1)
    losses: list[Literal["logits", "embedding", "hidden", "attention", "similarity"]] = Field(
        default_factory=lambda: ["logits"]
    )
    #: Student layer -> teacher layer for hidden/attention losses, e.g. [[0, 1], [1, 3]].
    #: Student layers count the blocks the student keeps (after `prune { method = layers }`).
    layer_map: list[list[int]] = Field(default_factory=list)
    #: How the `embedding` term compares sentence embeddings: 1 - cosine, or MSE of the
    #: mean-pooled hidden states.
    embedding_metric: Literal["cosine", "mse"] = "cosine"
    weights: LossWeights = Field(default_factory=LossWeights)
    #: Encoders: the teacher runs once per sample, before training, and its outputs stay in
    #: memory; with cache_teacher they are also saved under $PLANC_CACHE/teacher (keyed by the
    #: teacher's weights, the samples and the layers) for later runs.
    cache_teacher: bool = True

    @model_validator(mode="after")
    def _pairs(self) -> Distill:
        for pair in self.layer_map:
            if len(pair) != 2 or min(pair) < 0:
                raise ValueError(f"layer_map entries are [student, teacher] layer pairs, got {pair}")
        return self


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
    #: Parameters kept frozen, by module path glob (e.g. "embeddings.*"): not trained, not
    #: all-reduced, no optimizer state.
    freeze: list[str] = Field(default_factory=list)
    #: Train the plan's quantize steps quantization-aware (fake-quantized weights/activations);
    #: false trains in full precision and leaves quantization to the compile after training.
    qat: bool = True

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
