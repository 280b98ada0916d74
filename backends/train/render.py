"""Render the generated `train.py` and `launch.sh` from their templates.

Each `_block` function returns one piece of code for a placeholder of
`templates/train.py.tmpl`, written for the parallelism and features the plan uses only, so the
program reads like hand-written code instead of a maze of switches.
"""

from __future__ import annotations

import json
import string
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.train.checks import Mesh
from backends.train.options import TrainTarget
from passes.options import LowRank, PassOptions, Prune, Quantize

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Program:
    """Everything the templates need, resolved: nothing here is looked up again at run time."""

    target: TrainTarget
    mesh: Mesh
    model: dict[str, Any]  # planc_runtime.load_model spec
    task: str  # causal_lm | encoder
    data_path: str  # absolute path or "stdlib"
    compression: list[tuple[PassOptions, list[str]]]
    stage_cuts: list[int] | None
    plan_name: str
    #: data.exclude resolved to absolute paths (encoders).
    exclude_paths: tuple[str, ...] = ()

    @property
    def strategy(self) -> set[str]:
        return set(self.target.strategy)

    @property
    def pipeline(self) -> bool:
        return "pipeline" in self.strategy

    @property
    def fsdp(self) -> bool:
        return "fsdp" in self.strategy

    @property
    def tensor(self) -> bool:
        return "tensor" in self.strategy

    @property
    def ddp(self) -> bool:
        return "ddp" in self.strategy

    @property
    def fp16(self) -> bool:
        return self.target.precision == "fp16" and self.target.loss_scaling == "dynamic"

    @property
    def sharded_checkpoints(self) -> bool:
        return self.fsdp or self.tensor or self.pipeline

    @property
    def prunes(self) -> list[tuple[int, Prune, list[str]]]:
        return [(i, o, p) for i, (o, p) in enumerate(self.compression, 1) if isinstance(o, Prune)]

    @property
    def encoder(self) -> bool:
        """Encoders distill on sentences against cached teacher outputs (no next-token loss)."""
        return self.task == "encoder"

    @property
    def measures_activations(self) -> bool:
        return any(options.measures_activations for _, options, _ in self.prunes)

    @property
    def masked(self) -> list[tuple[int, Prune, list[str]]]:
        return [(i, o, p) for i, o, p in self.prunes if o.method in ("magnitude", "nm")]

    @property
    def gradual(self) -> bool:
        return any(o.schedule == "gradual" for _, o, _ in self.masked)


# ------------------------------------------------------------------------------ Python literals


def literal(value: Any, indent: int = 0, width: int = 100) -> str:
    """`value` as Python source in the project's style (double quotes, wrapped when long)."""
    flat = _flat(value)
    if len(flat) + indent <= width or not isinstance(value, (list, tuple, dict)) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{_flat(k)}: {literal(v, indent + 4, width)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{literal(v, indent + 4, width)}," for v in value]
    return "[\n" + "\n".join(items) + "\n" + " " * indent + "]"


def _flat(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flat(k)}: {_flat(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    return repr(value)


def _const(name: str, value: Any, comment: str | None = None) -> str:
    line = f"{name} = {literal(value, 0)}"
    return f"{line}  # {comment}" if comment and "\n" not in line and len(line) + len(comment) < 96 else (
        f"# {comment}\n{line}" if comment else line
    )


def _signature(name: str, params: list[str], returns: str | None = None) -> str:
    """`def name(params) -> returns:`, one parameter per line when it would pass 100 columns."""
    tail = f" -> {returns}:" if returns else ":"
    line = f"def {name}({', '.join(params)}){tail}"
    if len(line) <= 100:
        return line
    return f"def {name}(\n" + "".join(f"    {p},\n" for p in params) + f"){tail}"


def _indent(code: str, levels: int) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    " * levels)


# ------------------------------------------------------------------------------ the constants


def constants_block(p: Program) -> str:
    t = p.target
    autocast = "fp32" if p.fsdp else t.precision
    lines = [
        "# The model, rebuilt the way the plan's `model` line says.",
        _const("MODEL", p.model),
        _const("TASK", p.task, "causal_lm: next-token loss; encoder: distillation only"),
        "",
        textwrap.fill(f"Parallelism: {_strategy_words(p)}.", width=98, initial_indent="# ",
                      subsequent_indent="# ", break_on_hyphens=False),
        _const("STRATEGY", list(t.strategy)),
        _const("WORLD_SIZE", t.world_size, "processes the plan asked for; see launch.sh"),
        _const("PIPELINE_STAGES", p.mesh.pp),
        _const("TENSOR_PARALLEL", p.mesh.tp),
    ]
    if p.pipeline:
        lines += [
            _const("PIPELINE_SCHEDULE", t.pipeline.schedule),
            _const("MICROBATCHES", t.pipeline.microbatches, "chunks per micro-batch in the pipeline"),
            _const("STAGE_CUTS", p.stage_cuts, "first block of stages 1.. (None: balanced split)"),
        ]
    lines += [
        _const("SHARDED_CHECKPOINTS", p.sharded_checkpoints, "torch.distributed.checkpoint, else rank 0 torch.save"),
        "",
        "# Batch, steps and numerics.",
        _const("STEPS", t.steps),
        _const("MICRO_BATCH", t.micro_batch, "sequences per data-parallel rank per micro-step"),
        _const("ACCUMULATION", t.accumulation, "micro-steps per optimizer step"),
        _const("GLOBAL_BATCH", t.micro_batch * t.accumulation * p.mesh.dp, "sequences per optimizer step"),
        _const("SEED", t.seed),
        _const("PRECISION", t.precision),
        _const("AUTOCAST", autocast, "FSDP casts through its MixedPrecisionPolicy instead" if p.fsdp else None),
        _const("LOSS_SCALING", t.loss_scaling if t.precision == "fp16" else "none"),
        *([_const("LOSS_SCALE", {"init_scale": 2.0**16, "growth_interval": 2000}, "dynamic fp16 loss scale")]
          if p.fp16 else []),
        _const("GRAD_CLIP", t.grad_clip, "max global gradient norm (None: no clipping)"),
        _const("ACTIVATION_CHECKPOINTING", t.activation_checkpointing),
        _const("OPTIMIZER", t.optimizer.model_dump()),
        _const(
            "SCHEDULE",
            {"warmup": t.schedule.warmup, "decay": t.schedule.decay, "min_ratio": t.schedule.min_lr_ratio},
        ),
        "",
        *_data_constants(p),
        _const("EVAL_SEQUENCES", t.eval_sequences, "held-out sequences evaluated, over all ranks"),
        _const("LOG_EVERY", t.log_every),
        _const("CHECKPOINT", t.checkpoint.model_dump()),
        _const("SAVE", t.save, "trained weights, relative to this folder"),
    ]
    if t.freeze:
        lines.append(_const("FREEZE", list(t.freeze), "module path globs kept frozen"))
    if t.dropout is not None:
        lines.append(_const("DROPOUT", t.dropout, "every dropout probability of the trained model"))
    if t.distill is not None:
        d = t.distill
        distill: dict[str, Any] = {"temperature": d.temperature, "alpha": d.alpha, "losses": list(d.losses),
                                   "layer_map": [list(pair) for pair in d.layer_map]}
        comment = "# Knowledge distillation from the unmodified model (the teacher, frozen)."
        if p.encoder:
            distill = {"losses": list(d.losses), "layer_map": distill["layer_map"],
                       "weights": d.weights.model_dump(), "embedding_metric": d.embedding_metric,
                       "cache_teacher": d.cache_teacher}
            comment = ("# Knowledge distillation from the unmodified model (the teacher, frozen), whose outputs\n"
                       "# are computed once per sample before training (student layer -> teacher layer in layer_map).")
        lines += ["", comment, _const("DISTILL", distill)]
    lines += _compression_constants(p)
    return "\n".join(lines)


#: The `data` options a decoder's packed-token corpus uses.
_PACKED_DATA = ("path", "glob", "tokenizer", "seq_len", "max_bytes", "heldout")


def _data_constants(p: Program) -> list[str]:
    data = {**p.target.data.model_dump(), "path": p.data_path}
    if not p.encoder:
        return [
            "# Data: tokenized once per run, packed into sequences; the held-out tail is never trained on.",
            _const("DATA", {k: data[k] for k in _PACKED_DATA}),
        ]
    data["exclude"] = list(p.exclude_paths)
    return [
        "# Data: sentences (one sample each, padded per batch) from the plan's text and the machine's",
        "# own prose, none from `exclude`; the held-out share is never trained on.",
        _const("DATA", data),
    ]


def _strategy_words(p: Program) -> str:
    m = p.mesh
    parts = []
    if p.pipeline:
        parts.append(f"{m.pp} pipeline stages ({p.target.pipeline.schedule}, {p.target.pipeline.microbatches} microbatches)")
    if p.tensor:
        parts.append(f"tensor parallel over {m.tp} ranks")
    if p.fsdp:
        parts.append(f"FSDP over {m.dp} data-parallel ranks")
    elif p.ddp or (p.pipeline and m.dp > 1):
        parts.append(f"DDP over {m.dp} data-parallel ranks")
    words = " x ".join(parts) if parts else "a single replica"
    nodes = "1 node" if p.target.nodes == 1 else f"{p.target.nodes} nodes"
    return f"{words}; {p.target.world_size} processes on {nodes}"


def step_arguments(options: PassOptions) -> dict[str, Any]:
    """The options a compression step's runtime function takes (those that matter for its method)."""
    if isinstance(options, Prune):
        if options.method == "layers":
            return {"keep": list(options.keep or [])}
        if options.method in ("heads", "channels"):
            args = {"sparsity": options.sparsity, "importance": options.importance}
            return {**args, "reconstruct": True} if options.reconstruct else args
        if options.method == "nm":
            return {"method": "nm", "n": options.n, "m": options.m}
        return {"method": "magnitude", "sparsity": options.sparsity, "scope": options.scope}
    if isinstance(options, Quantize):
        args = {"scheme": options.scheme, "mode": options.mode, "granularity": options.granularity,
                "symmetric": options.symmetric}
        if options.granularity == "per_group":
            args["group_size"] = options.group_size
        return args
    if isinstance(options, LowRank):
        return {"rank": options.rank} if options.rank is not None else {"energy": options.energy}
    raise TypeError(f"{options.name} is not a compression step")


def _compression_constants(p: Program) -> list[str]:
    lines = []
    for i, (options, paths) in enumerate(p.compression, 1):
        if isinstance(options, Prune):
            what = {
                "magnitude": f"zero the {options.sparsity:.0%} smallest weights ({options.scope} threshold)",
                "nm": f"keep {options.n} of every {options.m} weights along the input",
                "heads": f"remove {options.sparsity:.0%} of attention heads ({options.importance} importance)",
                "channels": f"remove {options.sparsity:.0%} of MLP channels ({options.importance} importance)",
                "layers": f"keep blocks {options.keep} of the selected ones, remove the others",
            }[options.method]
            if options.reconstruct:
                what = what.replace(" importance)", " importance, least-squares refit)")
            when = (
                "before training"
                if options.method in ("heads", "channels", "layers")
                else "ramped up during training" if options.schedule == "gradual" else "kept through training"
            )
            lines += ["", f"# Step {i}, prune: {what}, {when}."]
        elif isinstance(options, Quantize):
            if not p.target.qat:
                continue  # trained in full precision; the compile after training quantizes
            act = "weights only" if options.mode == "weight_only" else "weights and activations"
            lines += ["", f"# Step {i}, quantize: {options.scheme} fake-quantization of {act} (QAT, straight-through gradients)."]
        elif isinstance(options, LowRank):
            size = f"rank {options.rank}" if options.rank else f"{options.energy:.0%} of the energy"
            lines += ["", f"# Step {i}, lowrank: train the factors of a truncated SVD ({size})."]
        else:
            continue
        lines.append(_const(f"STEP{i}", step_arguments(options)))
        lines.append(_const(f"STEP{i}_MODULES", paths))
    return lines


# ------------------------------------------------------------------------------ build_model


def build_block(p: Program) -> str:
    code = []
    if p.target.distill is not None:
        code.append("teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the unmodified model")
    code.append("shrink = rt.Shrink()  # structural cuts, undone (as zeros) when the weights are saved")
    mask_names = []
    for i, options, _ in p.prunes:
        measured = ", calibration=calibration" if options.measures_activations else ""
        if options.method == "heads":
            code.append(f"rt.shrink_attention_heads(model, STEP{i}_MODULES, shrink, **STEP{i}{measured})")
        elif options.method == "channels":
            code.append(f"rt.shrink_mlp_channels(model, STEP{i}_MODULES, shrink, **STEP{i}{measured})")
    for i, (options, _) in enumerate(p.compression, 1):
        if isinstance(options, LowRank):
            code.append(f"rt.factor_low_rank(model, STEP{i}_MODULES, **STEP{i})")
    for i, options, _ in p.masked:
        mask_names.append(f"masks_{i}")
        if options.schedule == "gradual":
            code.append(
                f"masks_{i} = rt.PruneMasks(model, STEP{i}_MODULES, **STEP{i}, gradual=True, "
                "ramp_steps=int(STEPS * SPARSITY_RAMP))"
            )
        else:
            code.append(f"masks_{i} = rt.PruneMasks(model, STEP{i}_MODULES, **STEP{i})")
        code.append(f"masks_{i}.update(step=0)  # masks from the initial weights, on the whole model")
    for i, (options, _) in enumerate(p.compression, 1):
        if isinstance(options, Quantize) and p.target.qat:
            code.append(f"rt.fake_quantize(model, STEP{i}_MODULES, **STEP{i})")
    for i, options, _ in p.prunes:
        if options.method == "layers":
            code.append(f"rt.drop_blocks(model, STEP{i}_MODULES, shrink, **STEP{i})  # last: the paths above are original")
    if p.target.freeze:
        code.append('log.info("%d parameters frozen", rt.freeze(model, FREEZE))')
    if p.target.dropout is not None:
        code.append("rt.set_dropout(model, DROPOUT)")
    code.append("if ACTIVATION_CHECKPOINTING:\n    rt.checkpoint_blocks(rt.find_blocks(model)[1])")
    masks = "[" + ", ".join(mask_names) + "]"
    if p.target.distill is not None and p.encoder:
        code.append("distiller = rt.EncoderDistiller(teacher, **DISTILL, student_blocks=len(rt.find_blocks(model)[1]))")
        code.append("distiller.prepare_student(model)")
        code.append(f"return model, distiller, shrink, {masks}")
    elif p.target.distill is not None:
        code.append(
            "distiller = rt.Distiller(teacher, model, **DISTILL)"
        )
        code.append(f"return model, distiller, shrink, {masks}")
    else:
        code.append(f"return model, shrink, {masks}")
    return _indent("\n".join(code), 1)


def build_call(p: Program) -> str:
    returned = "model, distiller, shrink, masks" if p.target.distill is not None else "model, shrink, masks"
    if not p.measures_activations:
        return f"{returned} = build_model(par)"
    text = "train_set" if p.encoder else "train_rows"
    return (f"calibration = rt.calibration_batches({text})  # the text pruning measures activations on\n"
            f"    {returned} = build_model(par, calibration)")


# ------------------------------------------------------------------------------ parallelize


def parallelize_block(p: Program) -> str:
    if p.pipeline:
        return _pipeline_parallelize(p)
    steps, doc = [], []
    if p.tensor:
        doc.append("tensor parallelism inside every block (q/k/v and fc_in split by rows, out_proj and\n"
                   "    fc_out by columns)")
        steps.append("rt.parallelize_tensor(blocks, par)")
    if p.fsdp:
        doc.append("FSDP2 over the data-parallel ranks, each block then the root")
        steps.append("return rt.shard_fsdp(model, blocks, par, PRECISION)")
    elif p.ddp:
        doc.append("DDP, a full replica on every rank whose gradients are all-reduced\n    during backward")
        if p.task == "encoder":
            steps.append("return rt.wrap_ddp(model, par, find_unused_parameters=True)  # the pooler is unused")
        else:
            steps.append("return rt.wrap_ddp(model, par)")
    else:
        steps.append("return model")
    body = ["blocks = rt.find_blocks(model)[1]"] if (p.tensor or p.fsdp) else []
    return (
        "def parallelize(model: torch.nn.Module, par: rt.Parallel) -> torch.nn.Module:\n"
        f'    """The module to train: {", then ".join(doc) or "the model itself"}."""\n'
        + _indent("\n".join(body + steps), 1)
        + "\n"
    )


def _pipeline_parallelize(p: Program) -> str:
    schedule = "ScheduleGPipe" if p.target.pipeline.schedule == "gpipe" else "Schedule1F1B"
    inner = []
    if p.tensor:
        inner.append("rt.parallelize_tensor(list(stage_module.blocks.values()), par)")
    if p.fsdp:
        inner.append("rt.shard_fsdp(stage_module, list(stage_module.blocks.values()), par, PRECISION)")
    else:
        inner.append("# Replicas of the pipeline (if any) average their gradients after each step.")
    inner_code = "\n".join(inner)
    return f'''class PipelineLoss:
    """The last stage's loss for one pipeline chunk.

    Gradients add up over MICROBATCHES x ACCUMULATION chunks, so each loss is divided by that
    count (the schedule's own grad scaling is off). `recorded` keeps the undivided losses.
    """

    def __init__(self, scaler: torch.amp.GradScaler | None = None):
        self.scaler, self.recorded = scaler, []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = rt.causal_lm_loss(logits, targets)
        self.recorded.append(loss.detach())
        loss = loss / (MICROBATCHES * ACCUMULATION)
        return self.scaler.scale(loss) if self.scaler is not None else loss


def parallelize(model: torch.nn.Module, par: rt.Parallel, loss_fn: PipelineLoss):
    """This rank's pipeline stage (a contiguous group of blocks) and the schedule that runs it."""
    first, last = rt.split_blocks(len(model.blocks), PIPELINE_STAGES, STAGE_CUTS)[par.pp_rank]
    log.info("pipeline stage %d/%d: blocks %d..%d", par.pp_rank, PIPELINE_STAGES, first, last - 1)
    stage_module = rt.DecoderStage(model, first, last)
{_indent(inner_code, 1)}
    group = par.mesh["pp"].get_group()
    stage = PipelineStage(stage_module, par.pp_rank, PIPELINE_STAGES, par.device, group=group)
    schedule = {schedule}(stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn, scale_grads=False)
    return stage_module, stage, schedule
'''


def parallelize_call(p: Program) -> str:
    if p.pipeline:
        scaler = "scaler" if p.fp16 else ""
        code = (
            f"loss_fn = PipelineLoss({scaler})\n"
            "    trained, stage, schedule = parallelize(model, par, loss_fn)"
        )
        if p.masked:
            code += "\n    for mask in masks:\n        mask.bind(trained)  # this stage's weights only"
        return code
    code = "trained = parallelize(model, par)"
    if p.masked:
        why = "  # the weights are shards now" if (p.fsdp or p.tensor) else ""
        code += f"\n    for mask in masks:\n        mask.bind(model){why}"
    return code


def scaler_setup(p: Program) -> str:
    if not p.fp16:
        return ""
    synced = "True" if (p.sharded_checkpoints) else "False"
    why = "ranks hold different gradients" if p.sharded_checkpoints else "DDP gradients are identical on all ranks"
    return _indent(f"scaler = rt.make_grad_scaler(par.device, synced={synced}, **LOSS_SCALE)  # {why}", 1)


# ------------------------------------------------------------------------------ the step


def train_step_block(p: Program) -> str:
    if p.pipeline:
        return '''def train_step(
    stage: PipelineStage, schedule, loss_fn: PipelineLoss, micro_batches: list[torch.Tensor], par: rt.Parallel
) -> torch.Tensor:
    """ACCUMULATION pipeline steps; the schedule splits each micro-batch into MICROBATCHES chunks.

    Stage 0 feeds the token ids, the last stage the targets; the mean loss is known on the last stage.
    """
    losses = []
    for batch in micro_batches:
        inputs, targets = batch[:, :-1].to(par.device), batch[:, 1:].to(par.device)
        args = (inputs,) if stage.is_first else ()
        kwargs = {"target": targets} if stage.is_last else {}
        loss_fn.recorded.clear()
        with rt.autocast(AUTOCAST, par.device):
            schedule.step(*args, **kwargs)
        losses += loss_fn.recorded[-MICROBATCHES:]  # the first step also probes shapes through loss_fn
    return torch.stack(losses).mean() if losses else torch.zeros((), device=par.device)
'''
    distill = p.target.distill is not None
    if p.encoder:
        return _encoder_train_step(p)
    if distill:
        loss = "loss = distiller.loss(output, inputs, rt.causal_lm_loss(rt.logits_of(output), targets))"
    else:
        loss = "loss = rt.causal_lm_loss(rt.logits_of(output), targets)"
    backward = "scaler.scale(loss / ACCUMULATION).backward()" if p.fp16 else "(loss / ACCUMULATION).backward()"
    if p.ddp:
        sync_doc = ";\n    DDP all-reduces gradients on the last one only"
        sync = "sync = contextlib.nullcontext() if last else trained.no_sync()"
        body = f"""\
        {sync}
        with sync:
            with rt.autocast(AUTOCAST, par.device):
                output = trained(inputs)
                {loss}
            {backward}"""
    else:
        sync_doc = ";\n    FSDP reduce-scatters gradients on the last one only" if p.fsdp else ""
        sync = "trained.set_requires_gradient_sync(last)\n        " if p.fsdp else ""
        body = f"""\
        {sync}with rt.autocast(AUTOCAST, par.device):
            output = trained(inputs)
            {loss}
        {backward}"""
    params = ["trained: torch.nn.Module"]
    params += ["distiller: rt.Distiller"] if distill else []
    params += ["micro_batches: list[torch.Tensor]", "par: rt.Parallel"]
    params += ["scaler: torch.amp.GradScaler"] if p.fp16 else []
    return f'''{_signature("train_step", params, "torch.Tensor")}
    """Forward and backward over the step's ACCUMULATION micro-batches{sync_doc}."""
    total = torch.zeros((), device=par.device)
    for i, batch in enumerate(micro_batches):
        inputs, targets = batch[:, :-1].to(par.device), batch[:, 1:].to(par.device)
        last = i == len(micro_batches) - 1
{body}
        total += loss.detach()
    return total / len(micro_batches)
'''


def _encoder_train_step(p: Program) -> str:
    backward = "scaler.scale(loss / ACCUMULATION).backward()" if p.fp16 else "(loss / ACCUMULATION).backward()"
    forward = [
        "with rt.autocast(AUTOCAST, par.device):",
        "    output = trained(**rt.sentence_inputs(batch, par.device), **distiller.student_options())",
        "    loss = distiller.loss(output, batch)",
        backward,
    ]
    if p.ddp:
        sync_doc = ";\n    DDP all-reduces gradients on the last one only"
        lines = ["sync = contextlib.nullcontext() if last else trained.no_sync()", "with sync:"]
        lines += ["    " + line for line in forward]
    else:
        sync_doc = ";\n    FSDP reduce-scatters gradients on the last one only" if p.fsdp else ""
        lines = ["trained.set_requires_gradient_sync(last)"] if p.fsdp else []
        lines += forward
    body = _indent("\n".join(lines), 2)
    params = ["trained: torch.nn.Module", "distiller: rt.EncoderDistiller", "micro_batches: list[dict]",
              "par: rt.Parallel"]
    params += ["scaler: torch.amp.GradScaler"] if p.fp16 else []
    return f'''{_signature("train_step", params, "torch.Tensor")}
    """Forward and backward over the step's ACCUMULATION batches of sentences{sync_doc}.

    The loss compares the student with the teacher's outputs cached for each sentence.
    """
    total = torch.zeros((), device=par.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
{body}
        total += loss.detach()
    return total / len(micro_batches)
'''


def train_step_args(p: Program) -> str:
    if p.pipeline:
        return "stage, schedule, loss_fn, micro_batches, par"
    args = ["trained"]
    if p.target.distill is not None:
        args.append("distiller")
    args += ["micro_batches", "par"]
    if p.fp16:
        args.append("scaler")
    return ", ".join(args)


def optimizer_step_block(p: Program) -> str:
    params = "list(trained.parameters())"
    lines = []
    if p.pipeline and not p.fsdp:
        lines.append(f"rt.all_reduce_grads({params}, par)  # data parallel across pipeline replicas")
    if p.fp16:
        lines.append("scaler.unscale_(optimizer)")
    if p.pipeline:
        lines.append("# The global gradient norm adds up the norms of the stages.")
        lines.append(f'grad_norm = rt.clip_grad_norm({params}, GRAD_CLIP, group=par.mesh["pp"].get_group())')
    else:
        lines.append(f"grad_norm = rt.clip_grad_norm({params}, GRAD_CLIP)")
    if p.fp16:
        lines += [
            "scale = scaler.get_scale()",
            "scaler.step(optimizer)  # skipped if a gradient overflowed anywhere",
            "scaler.update()",
            "skipped_steps += int(scaler.get_scale() < scale)",
        ]
    else:
        lines.append("optimizer.step()")
    lines.append("optimizer.zero_grad(set_to_none=True)")
    if p.masked:
        lines.append("for mask in masks:\n    mask.apply()  # pruned weights stay zero")
    return _indent("\n".join(lines), 2)


def before_step_block(p: Program) -> str:
    if not p.gradual:
        return ""
    return _indent("for mask in masks:\n    mask.update(step)  # gradual pruning: sparsity ramps up", 2)


def extra_metrics(p: Program) -> str:
    extra = []
    if p.fp16:
        extra.append("loss_scale=scaler.get_scale()")
    if p.masked:
        extra.append("sparsity=[round(mask.sparsity(), 4) for mask in masks]")
    return "".join(f"\n                {e}," for e in extra)


def extra_checkpoint(p: Program) -> str:
    extra = []
    if p.fp16:
        extra.append("scaler=scaler.state_dict()")
    if p.masked:
        extra.append("masks=[mask.state_dict() for mask in masks]")
    return "".join(f", {e}" for e in extra)


def resume_block(p: Program) -> str:
    code = []
    if p.fp16:
        code.append('scaler.load_state_dict(resumed["scaler"])')
    if p.masked:
        code.append('for mask, saved in zip(masks, resumed["masks"]):\n    mask.load_state_dict(saved)')
    return _indent("\n".join(code), 2) if code else ""


# ------------------------------------------------------------------------------ evaluation


def evaluate_block(p: Program) -> str:
    if p.pipeline:
        return '''@torch.no_grad()
def evaluate(
    stage: PipelineStage, schedule, loss_fn: PipelineLoss, heldout: list[torch.Tensor], par: rt.Parallel
) -> dict[str, float]:
    """Mean held-out loss, run forward-only through the pipeline."""
    total, count = torch.zeros((), device=par.device), 0
    for batch in heldout:
        inputs, targets = batch[:, :-1].to(par.device), batch[:, 1:].to(par.device)
        args = (inputs,) if stage.is_first else ()
        kwargs = {"target": targets} if stage.is_last else {}
        loss_fn.recorded.clear()
        with rt.autocast(AUTOCAST, par.device):
            schedule.eval(*args, **kwargs)
        if loss_fn.recorded:  # the last stage: one loss per equally sized chunk
            total += torch.stack(loss_fn.recorded[-MICROBATCHES:]).mean() * len(batch)
        count += len(batch)
    loss_fn.recorded.clear()
    return {"eval_loss": rt.global_mean(total, count, par)}
'''
    distill = p.target.distill is not None
    if p.encoder:
        return '''@torch.no_grad()
def evaluate(
    trained: torch.nn.Module, distiller: rt.EncoderDistiller, heldout: list[dict], par: rt.Parallel
) -> dict[str, float]:
    """Held-out distillation loss and student-teacher cosine of the sentence embeddings."""
    trained.eval()
    sums = {key: torch.zeros((), device=par.device) for key in ("eval_loss", "eval_cosine")}
    count = 0
    for batch in heldout:
        with rt.autocast(AUTOCAST, par.device):
            output = trained(**rt.sentence_inputs(batch, par.device), **distiller.student_options())
            sums["eval_loss"] += distiller.loss(output, batch, "heldout").float() * len(batch["index"])
        sums["eval_cosine"] += distiller.cosines(output, batch, "heldout").sum()
        count += len(batch["index"])
    trained.train()
    return {key: rt.global_mean(total, count, par) for key, total in sums.items()}
'''
    else:
        measure = """\
        with rt.autocast(AUTOCAST, par.device):
            output = trained(inputs)
        logits = rt.logits_of(output)
        sums["eval_loss"] += rt.causal_lm_loss(logits, targets) * len(batch)"""
        if distill:
            measure += """
        if "logits" in distiller.losses:
            with rt.autocast(AUTOCAST, par.device):
                teacher_logits = rt.logits_of(distiller.teacher(inputs))
            sums["distill_kl"] += distiller.kl(logits, teacher_logits) * len(batch)"""
    keys = '("eval_loss", "distill_kl")' if distill and p.task != "encoder" else '("eval_loss",)'
    what = " (and the student-teacher KL)" if distill and p.task != "encoder" else ""
    params = ["trained: torch.nn.Module"] + (["distiller: rt.Distiller"] if distill else [])
    params += ["heldout: list[torch.Tensor]", "par: rt.Parallel"]
    return f'''@torch.no_grad()
{_signature("evaluate", params, "dict[str, float]")}
    """Mean held-out loss{what} over every evaluated sequence."""
    trained.eval()
    sums = {{key: torch.zeros((), device=par.device) for key in {keys}}}
    count = 0
    for batch in heldout:
        inputs, targets = batch[:, :-1].to(par.device), batch[:, 1:].to(par.device)
{measure}
        count += len(batch)
    trained.train()
    return {{key: rt.global_mean(total, count, par) for key, total in sums.items()}}
'''


def eval_args(p: Program) -> str:
    if p.pipeline:
        return "stage, schedule, loss_fn, heldout, par"
    return "trained, distiller, heldout, par" if p.target.distill is not None else "trained, heldout, par"


# ------------------------------------------------------------------------------ whole files


def summary(p: Program) -> str:
    t = p.target
    features = [f"precision {t.precision}"]
    if t.accumulation > 1:
        features.append(f"{t.accumulation}-step gradient accumulation")
    if t.activation_checkpointing:
        features.append("activation checkpointing")
    if t.distill is not None:
        features.append(f"distillation ({', '.join(t.distill.losses)})")
    steps = [_step_words(o) for o, _ in p.compression if p.target.qat or not isinstance(o, Quantize)]
    if steps:
        features.append("compression-aware: " + ", ".join(steps))
    return textwrap.fill(
        f"Trains {_model_words(p)} for {t.steps} steps with {_strategy_words(p)}; " + ", ".join(features) + ".",
        width=96,
        break_on_hyphens=False,
    )


def _step_words(options: PassOptions) -> str:
    if isinstance(options, Prune):
        return f"prune {options.method}"
    if isinstance(options, Quantize):
        return f"quantize {options.scheme}"
    return options.name


def _model_words(p: Program) -> str:
    if p.model["kind"] == "factory":
        return f"{p.model['function']}({', '.join(f'{k}={v!r}' for k, v in p.model.get('args', {}).items())})"
    return f"the Hugging Face model {p.model.get('package') or ''}{'/' if p.model.get('package') else ''}{p.model['ref']}"


def imports_block(p: Program) -> str:
    stdlib = ["import contextlib"] if p.ddp and not p.pipeline else []
    if p.target.distill is not None:
        stdlib.append("import copy")
    stdlib += ["import logging", "from pathlib import Path"]
    third = ["import torch", "import torch.distributed as dist"]
    if p.pipeline:
        schedule = "ScheduleGPipe" if p.target.pipeline.schedule == "gpipe" else "Schedule1F1B"
        third.append(f"from torch.distributed.pipelining import PipelineStage, {schedule}")
    return "\n".join(stdlib) + "\n\n" + "\n".join(third) + "\n\nimport planc_runtime as rt"


def load_data_block(p: Program) -> str:
    if p.encoder:
        return _indent("""
            train_set, heldout_set = rt.load_sentence_corpus(DATA, MODEL, HERE)
            log.info("data: %d training and %d held-out sentences, %.1f tokens on average",
                     len(train_set), len(heldout_set), train_set.mean_tokens)
            """, 1)
    return _indent("""
        train_rows, heldout_rows = rt.load_token_corpus(DATA, MODEL, HERE)
        log.info("data: %d training and %d held-out sequences of %d tokens",
                 len(train_rows), len(heldout_rows), DATA["seq_len"])
        """, 1)


def tokens_per_step(p: Program) -> str:
    if p.encoder:
        return "tokens_per_step = MICRO_BATCH * ACCUMULATION * par.dp_size * train_set.mean_tokens  # on average"
    return 'tokens_per_step = MICRO_BATCH * ACCUMULATION * par.dp_size * DATA["seq_len"]'


def streams_block(p: Program) -> str:
    if p.encoder:
        return _indent("""
            stream = rt.SentenceBatches(train_set, MICRO_BATCH, par.dp_rank, par.dp_size, seed=SEED)
            heldout = rt.sentence_heldout_batches(heldout_set, MICRO_BATCH, par.dp_rank, par.dp_size, EVAL_SEQUENCES)
            # The teacher runs once per sentence, now: on this rank's shard and held-out share.
            teacher_cache = rt.planc_cache_dir() / "teacher"
            distiller.prepare("train", train_set, stream.shard, par.device, teacher_cache)
            distiller.prepare("heldout", heldout_set, [int(i) for b in heldout for i in b["index"]], par.device,
                              teacher_cache)
            """, 1)
    return _indent(f"""
        stream = rt.BatchStream(train_rows, MICRO_BATCH, par.dp_rank, par.dp_size, seed=SEED)
        heldout = rt.heldout_batches(
            heldout_rows, MICRO_BATCH, par.dp_rank, par.dp_size, EVAL_SEQUENCES{", multiple=MICROBATCHES" if p.pipeline else ""}
        )
        """, 1)


def render_train_py(p: Program) -> str:
    imports = imports_block(p)
    constants = constants_block(p)
    if p.gradual:
        constants += "\n" + _const("SPARSITY_RAMP", p.target.sparsity_ramp, "fraction of STEPS over which gradual pruning ramps")
    blocks = dict(
        plan_name=p.plan_name,
        summary=summary(p),
        imports=imports,
        constants=constants,
        build_body=build_block(p),
        build_params="par: rt.Parallel, calibration: list[dict]" if p.measures_activations else "par: rt.Parallel",
        parallelize=parallelize_block(p),
        train_step=train_step_block(p),
        evaluate=evaluate_block(p),
        build_call=build_call(p),
        parallelize_call=parallelize_call(p),
        scaler_setup=scaler_setup(p),
        resume_body=resume_block(p),
        before_step=before_step_block(p),
        train_step_args=train_step_args(p),
        optimizer_step=optimizer_step_block(p),
        extra_metrics=extra_metrics(p),
        extra_checkpoint=extra_checkpoint(p),
        eval_args=eval_args(p),
        load_data=load_data_block(p),
        tokens_per_step=tokens_per_step(p),
        streams=streams_block(p),
    )
    # A placeholder alone on its line that renders to nothing removes its line.
    blocks = {k: v if v or k in _INLINE else _DROP for k, v in blocks.items()}
    text = string.Template((TEMPLATES / "train.py.tmpl").read_text()).substitute(blocks)
    return "\n".join(line for line in text.splitlines() if line.strip() != _DROP) + "\n"


_DROP = "<planc: drop this line>"
_INLINE = {"extra_metrics", "extra_checkpoint", "tokens_per_step"}


def render_launch_sh(target: TrainTarget, plan_name: str) -> str:
    template = string.Template((TEMPLATES / "launch.sh.tmpl").read_text())
    return template.substitute(
        plan_name=plan_name,
        nproc_per_node=target.nproc_per_node,
        nnodes=target.nodes,
        rdzv_endpoint=target.rdzv_endpoint or "",
        max_restarts=target.max_restarts,
    )
