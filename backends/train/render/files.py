"""Whole files: the summary, imports and data blocks, then `train.py` and `launch.sh` from their templates."""

from __future__ import annotations

import string
import textwrap
from pathlib import Path

from planc.backends.train.options import TrainTarget
from planc.passes.options import PassOptions
from planc.passes.prune import Prune
from planc.passes.quantize import Quantize

from planc.backends.train.render.loop_code import (
    after_training_block,
    before_step_block,
    eval_args,
    evaluate_block,
    extra_checkpoint,
    extra_metrics,
    optimizer_step_block,
    parallelize_block,
    parallelize_call,
    resume_block,
    scaler_setup,
    train_step_args,
    train_step_block,
)
from planc.backends.train.render.program import TEMPLATES, Program, _const, _indent
from planc.backends.train.render.setup_code import build_block, build_call, build_params, constants_block, strategy_words

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
    if t.regularize is not None:
        penalty = "L1 on weights" if t.regularize.group == "weights" else f"group lasso on {t.regularize.group}"
        features.append(f"{penalty} (l1 {t.regularize.l1:g})")
    steps = [_step_words(o) + (" after training" if p.defers(o) else "")
             for o, _ in p.compression if p.target.qat or not isinstance(o, Quantize)]
    if steps:
        features.append("compression-aware: " + ", ".join(steps))
    return textwrap.fill(
        f"Trains {_model_words(p)} for {t.steps} steps with {strategy_words(p)}; " + ", ".join(features) + ".",
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
    if "package" in p.model:
        return f"the Hugging Face model {p.model['package']}/{p.model['ref']}"
    return f"the Hugging Face model {Path(p.model['directory']).name}"


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
        build_params=build_params(p),
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
        after_training=after_training_block(p),
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
