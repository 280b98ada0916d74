"""The program's constants and `build_model`: the plan's values, the model and its compression."""

from __future__ import annotations

import textwrap
from typing import Any

from planc.passes.lowrank import LowRank

from planc.passes.options import PassOptions

from planc.passes.prune import Prune

from planc.passes.quantize import Quantize

from planc.passes.share import Share

from planc.backends.train.render.program import Program, _const, _indent

# ------------------------------------------------------------------------------ the constants


def constants_block(p: Program) -> str:
    t = p.target
    autocast = "fp32" if p.fsdp else t.precision
    lines = [
        "# The model, rebuilt the way the plan's `model` line says.",
        _const("MODEL", p.model),
        _const("TASK", p.task, "causal_lm: next-token loss; encoder: distillation only"),
        "",
        textwrap.fill(f"Parallelism: {strategy_words(p)}.", width=98, initial_indent="# ",
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
    lines += _regularize_constants(p)
    return "\n".join(lines)


#: How each `regularize { group }` reads in the program's comments.
_PENALTY = {
    "heads": ["group lasso on attention heads, L1 * sum_g sqrt(p_g) * ||W_g||_2;",
              "a head g: its q/k/v rows and biases and its out-projection columns, p_g: their count."],
    "channels": ["group lasso on MLP channels, L1 * sum_g sqrt(p_g) * ||W_g||_2;",
                 "a channel g: its up/gate rows and biases and its down-projection column, p_g: their count."],
    "weights": ["L1 on the Linear weights, L1 * sum |w|."],
}


def _regularize_constants(p: Program) -> list[str]:
    regularize = p.target.regularize
    if regularize is None:
        return []
    steps = [f"STEP{i}_MODULES" for i, _, _ in p.deferred]
    what, *more = _PENALTY[regularize.group]
    where = "the modules of the prune steps above" if steps else "the whole model"
    return [
        "",
        f"# Regularization: {what}",
        *(f"# {line}" for line in more),
        "# Minimized by a proximal step after each optimizer step, which sets groups exactly to zero;",
        "# at the end, what is at or below `threshold` counts as zero and is set to zero.",
        _const("REGULARIZE", regularize.model_dump()),
        f"REGULARIZE_MODULES = {steps[0] if len(steps) == 1 else 'sorted({' + ', '.join('*' + s for s in steps) + '})' if steps else 'None'}"
        f"  # {where}",
    ]


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


def strategy_words(p: Program) -> str:
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
    if isinstance(options, Share):
        return {"kv_heads": options.kv_heads}
    raise TypeError(f"{options.name} is not a compression step")


def _compression_constants(p: Program) -> list[str]:
    lines = []
    for i, (options, paths) in enumerate(p.compression, 1):
        if isinstance(options, Share):
            kind = "multi-query" if options.kv_heads == 1 else "grouped-query"
            lines += ["", f"# Step {i}, share: {kind} attention, key/value heads mean-pooled per group, before training."]
            lines.append(_const(f"STEP{i}", step_arguments(options)))
            continue
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
                "after training" if p.defers(options)
                else "before training"
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
    for i, (options, _) in enumerate(p.compression, 1):
        if isinstance(options, Share):  # the architecture first: every later step sees the grouped model
            code.append(f'log.info("share: %s", rt.share_kv_heads(model, **STEP{i}))')
    code.append("shrink = rt.Shrink()  # structural cuts, undone (as zeros) when the weights are saved")
    mask_names = []
    for i, options, _ in p.prunes:
        traced = ", example=example" + (", calibration=calibration" if options.measures_activations else "")
        if options.method == "heads":
            code.append(f"rt.shrink_attention_heads(model, STEP{i}_MODULES, shrink, **STEP{i}{traced})")
        elif options.method == "channels":
            code.append(f"rt.shrink_mlp_channels(model, STEP{i}_MODULES, shrink, **STEP{i}{traced})")
    if p.target.regularize is not None:
        example = ", example=example" if p.regularizes_units else ""
        code.append(f"regularizer = rt.regularizer(model, REGULARIZE_MODULES, **REGULARIZE{example})")
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
    if p.target.regularize is not None:
        masks += ", regularizer"
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
    if p.target.regularize is not None:
        returned += ", regularizer"
    text = "train_set" if p.encoder else "train_rows"
    lines, args = [], ["par"]
    if p.traces_units:
        why = "to prune" if p.shrinks_units else "to regularize"
        lines.append(f"example = rt.example_batch({text})  # traced to find the heads and channels {why}")
        args.append("example")
    if p.measures_activations:
        lines.append(f"calibration = rt.calibration_batches({text})  # the text pruning measures activations on")
        args.append("calibration")
    return "\n    ".join([*lines, f"{returned} = build_model({', '.join(args)})"])


def build_params(p: Program) -> str:
    params = ["par: rt.Parallel"]
    if p.traces_units:
        params.append("example: dict[str, torch.Tensor]")
    if p.measures_activations:
        params.append("calibration: list[dict]")
    return ", ".join(params)
