"""The program's parallelization, training step, optimizer step and evaluation, for the
parallelism and features the plan uses only."""

from __future__ import annotations



from planc.backends.train.render.program import Program, _indent, _signature

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
    """This rank's pipeline stage (a contiguous group of blocks), the schedule that trains it and
    the one that evaluates it."""
    first, last = rt.split_blocks(len(model.blocks), PIPELINE_STAGES, STAGE_CUTS)[par.pp_rank]
    log.info("pipeline stage %d/%d: blocks %d..%d", par.pp_rank, PIPELINE_STAGES, first, last - 1)
    stage_module = rt.DecoderStage(model, first, last)
{_indent(inner_code, 1)}
    group = par.mesh["pp"].get_group()
    stage = PipelineStage(stage_module, par.pp_rank, PIPELINE_STAGES, par.device, group=group)
    schedule = {schedule}(stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn, scale_grads=False)
    # Evaluation runs forward-only on a stage object of its own: torch 2.11 sets up a stage's
    # receive buffers once, at its first schedule call, and a forward-only first call (the
    # step-0 evaluation) would leave training without gradients for the previous stage.
    eval_stage = PipelineStage(stage_module, par.pp_rank, PIPELINE_STAGES, par.device, group=group)
    evaluation = {schedule}(eval_stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn, scale_grads=False)
    return stage_module, stage, schedule, evaluation
'''


def parallelize_call(p: Program) -> str:
    if p.pipeline:
        scaler = "scaler" if p.fp16 else ""
        code = (
            f"loss_fn = PipelineLoss({scaler})\n"
            "    trained, stage, schedule, evaluation = parallelize(model, par, loss_fn)"
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
    if p.target.regularize is not None:
        lines.append("regularizer.prox(scheduler.get_last_lr()[0])  # the penalty's step: groups shrink, some to zero")
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
    if p.target.regularize is not None:
        extra += ["regularizer=regularizer.value()", "zero_groups=regularizer.zeros()"]
    return "".join(f"\n                {e}," for e in extra)


def after_training_block(p: Program) -> str:
    """Regularized training ends by zeroing what reached zero, then runs the prune steps that
    act on the regularized groups; the held-out evaluation that follows measures the result."""
    if p.target.regularize is None:
        return ""
    lines = [
        "# What reached zero is set exactly to zero; then the prune steps on the regularized groups run",
        "# on the trained weights (a removed unit is zero), so the held-out loss below is the pruned model's.",
        "report = regularizer.finish()",
    ]
    if p.deferred:
        steps = ", ".join(f'"step{i}": regularizer.prune(STEP{i}_MODULES, **STEP{i})' for i, _, _ in p.deferred)
        lines.append(f"report[\"prune\"] = {{{steps}}}")
    lines += [
        'metrics.write(event="regularize", step=STEPS, **report)',
        'log.info("regularize: %d of %d groups (%s) at or below %g", report["zero_groups"], report["groups"],',
        '         REGULARIZE["group"], REGULARIZE["threshold"])',
    ]
    return "\n" + _indent("\n".join(lines), 1)


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
        return "stage, evaluation, loss_fn, heldout, par"
    return "trained, distiller, heldout, par" if p.target.distill is not None else "trained, heldout, par"


