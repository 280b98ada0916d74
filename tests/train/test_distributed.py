"""Generated programs run under torchrun on CPU (gloo), 2 to 4 processes, a tiny GPT, 6 steps.

Every layout trains the same global batch of 8 sequences from the same seed, so each must
reproduce the single-process reference loss step by step (up to reduction order).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from train_helpers import (
    GPT_FILE,
    TINY_GPT,
    final_eval,
    free_port,
    gpt_source,
    metrics,
    run_program,
    small_corpus,
    step_losses,
    target,
)

from planc.backends.train.emit import emit_training_program
from planc.backends.train.launch import launch
from planc.backends.train import planc_runtime as rt
from planc.passes.prune import Prune

pytestmark = pytest.mark.slow

BLOCK_LINEARS = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "attn.v_proj", "mlp.fc_in", "mlp.fc_out")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def corpus(workdir: Path) -> Path:
    return small_corpus(workdir)


def emit(workdir: Path, name: str, corpus: Path, compression: list | None = None, model: Any = None,
         **options: Any) -> Path:
    return emit_training_program(target(corpus, **options), model or gpt_source(), compression or [], None,
                                 workdir / name, "")


def factory_model(**args: Any) -> torch.nn.Module:
    return rt.load_model({"kind": "factory", "file": str(GPT_FILE), "function": "gpt", "args": {**TINY_GPT, **args}})


@pytest.fixture(scope="module")
def reference(workdir: Path, corpus: Path) -> Path:
    """One process, 8 sequences per step, run as plain `python train.py` (no torchrun)."""
    out = emit(workdir, "reference", corpus, world_size=1, micro_batch=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "train.py"], cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def assert_matches_reference(out: Path, reference: Path, atol: float = 2e-4) -> None:
    losses, expected = step_losses(out), step_losses(reference)
    assert list(losses) == list(expected) == list(range(1, 7))
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], abs=atol), (step, losses, expected)


def test_reference_loss_is_the_eager_loss_and_falls(reference: Path, corpus: Path) -> None:
    losses = step_losses(reference)
    assert losses[6] < losses[1] - 0.5
    # Independent check of step 1: the factory's model at the seed, on the first batch.
    torch.manual_seed(0)
    model = factory_model()
    data = {"path": str(corpus), "glob": "*.py", "tokenizer": "bytes", "seq_len": 32, "max_bytes": 4_000_000,
            "heldout": 0.05}
    rows, _ = rt.load_token_corpus(data, {"kind": "factory"}, corpus.parent)
    batch = rt.BatchStream(rows, 8, 0, 1, seed=0).batch(0)
    with torch.no_grad():
        logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
    assert losses[1] == pytest.approx(loss.item(), abs=1e-5)
    trained = factory_model(checkpoint=str(reference / "trained.pt"))
    assert not torch.equal(trained.lm_head.weight, model.lm_head.weight)


def test_ddp_with_accumulation_matches_reference(workdir: Path, corpus: Path, reference: Path) -> None:
    out = emit(workdir, "ddp", corpus, strategy=["ddp"], micro_batch=2, accumulation=2)
    port = free_port()
    code = launch(out, {"NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"127.0.0.1:{port}", "OMP_NUM_THREADS": "1"},
                  timeout=240)
    assert code == 0
    assert_matches_reference(out, reference)
    assert final_eval(out)["eval_loss"] == pytest.approx(final_eval(reference)["eval_loss"], abs=2e-4)
    records = [r for r in metrics(out) if "tokens_per_s" in r]
    assert all(r["tokens_per_s"] > 0 and r["skipped_steps"] == 0 for r in records)


def test_pipeline_matches_reference(workdir: Path, corpus: Path, reference: Path) -> None:
    out = emit(workdir, "pipeline", corpus, strategy=["pipeline"], micro_batch=8, pipeline={"microbatches": 2})
    run_program(out, 2)
    assert_matches_reference(out, reference)
    assert final_eval(out)["eval_loss"] == pytest.approx(final_eval(reference)["eval_loss"], abs=2e-4)


def test_tensor_parallel_matches_reference(workdir: Path, corpus: Path, reference: Path) -> None:
    out = emit(workdir, "tensor", corpus, strategy=["tensor"], micro_batch=8)
    run_program(out, 2)
    assert_matches_reference(out, reference)


def test_fsdp_bf16_trains(workdir: Path, corpus: Path, reference: Path) -> None:
    out = emit(workdir, "fsdp", corpus, strategy=["fsdp"], precision="bf16", micro_batch=4)
    run_program(out, 2)
    losses = step_losses(out)
    assert losses[6] < losses[1] - 0.5
    assert_matches_reference(out, reference, atol=0.05)  # bf16 compute, fp32 master weights
    trained = factory_model(checkpoint=str(out / "trained.pt"))  # unsharded, loadable by the factory
    assert trained.blocks[0].mlp.fc_in.weight.dtype == torch.float32


def test_killed_rank_resumes_from_checkpoint(workdir: Path, corpus: Path, reference: Path) -> None:
    out = emit(workdir, "fault", corpus, strategy=["fsdp"], micro_batch=4, max_restarts=1, checkpoint={"every": 2})
    log = run_program(out, 2, env={"PLANC_FAIL_AT_STEP": "3", "PLANC_FAIL_RANK": "1"}, max_restarts=1)
    assert "rank 1 exits on purpose" in log
    events = [(r["event"], r["step"]) for r in metrics(out) if "event" in r]
    assert ("resume", 2) in events and events[-1] == ("done", 6)
    assert_matches_reference(out, reference)  # same data order and state after the restart
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_sparse_finetuning_keeps_masks_zero(workdir: Path, corpus: Path) -> None:
    compression = [
        (Prune(method="magnitude", sparsity=0.5), BLOCK_LINEARS[:4]),
        (Prune(method="nm", n=2, m=4), BLOCK_LINEARS[4:]),
        (Prune(method="heads", sparsity=0.25), ["blocks.0.attn"]),
    ]
    out = emit(workdir, "sparse", corpus, compression, strategy=["ddp"], micro_batch=4)
    run_program(out, 2)
    assert step_losses(out)[6] < step_losses(out)[1]
    torch.manual_seed(0)
    initial = factory_model()
    trained = factory_model(checkpoint=str(out / "trained.pt"))
    for path in BLOCK_LINEARS[:4]:
        if path == "blocks.0.attn.q_proj" or path == "blocks.0.attn.v_proj":
            continue  # also shrunk by head pruning
        before, after = initial.get_submodule(path).weight, trained.get_submodule(path).weight
        smallest = before.abs().flatten().argsort()[: before.numel() // 2]
        assert (after.flatten()[smallest] == 0).all() and int((after == 0).sum()) == before.numel() // 2
    for path in BLOCK_LINEARS[4:]:
        groups = trained.get_submodule(path).weight.reshape(-1, 4)
        assert ((groups == 0).sum(1) >= 2).all()
    # One of four heads of block 0 was removed: its q/k/v rows come back as zeros.
    q = trained.blocks[0].attn.q_proj.weight.reshape(4, 16, -1)
    assert sum(bool((q[h] == 0).all()) for h in range(4)) == 1


def test_distillation_lowers_student_teacher_kl(workdir: Path, corpus: Path, reference: Path) -> None:
    teacher = gpt_source(checkpoint=str(reference / "trained.pt"))
    # A student far from its teacher: half the heads gone, 80% of the LM head's weights zero.
    compression = [(Prune(method="heads", sparsity=0.5), ["blocks.0.attn", "blocks.1.attn"]),
                   (Prune(method="magnitude", sparsity=0.8), ["lm_head"])]
    out = emit(workdir, "distill", corpus, compression, model=teacher, strategy=["ddp"], micro_batch=4,
               distill={"alpha": 1.0, "temperature": 1.0})
    run_program(out, 2)
    evals = [r for r in metrics(out) if r.get("event") == "eval"]
    before, after = evals[0]["distill_kl"], evals[-1]["distill_kl"]
    assert after < 0.8 * before, (before, after)


def test_fp16_overflow_skips_steps(workdir: Path, corpus: Path) -> None:
    out = emit(workdir, "fp16", corpus, strategy=["ddp"], precision="fp16", micro_batch=4)
    program = out / "train.py"
    # An engineer's edit: start from too large a loss scale, which overflows until it backs off.
    program.write_text(program.read_text().replace('"init_scale": 65536.0', '"init_scale": 1e6'))
    run_program(out, 2)
    records = [r for r in metrics(out) if "loss" in r and "event" not in r]
    scales = [r["loss_scale"] for r in records]
    halvings = sum(1 for a, b in zip([1e6, *scales], scales) if b < a)
    assert 1 <= records[-1]["skipped_steps"] == halvings < len(records)
    assert records[-1]["loss"] < records[0]["loss"]  # the steps that were not skipped trained


def test_pipeline_replicas_average_gradients(workdir: Path, corpus: Path, reference: Path) -> None:
    out = emit(workdir, "pipeline_ddp", corpus, strategy=["pipeline", "ddp"], world_size=4, micro_batch=4,
               pipeline={"stages": 2, "microbatches": 2, "schedule": "gpipe"})
    run_program(out, 4)
    assert_matches_reference(out, reference)


def test_fsdp_with_tensor_parallel(workdir: Path, corpus: Path, reference: Path) -> None:
    out = emit(workdir, "fsdp_tensor", corpus, strategy=["fsdp", "tensor"], world_size=4, tensor_parallel=2,
               micro_batch=4)
    run_program(out, 4)
    assert_matches_reference(out, reference)


def test_two_trainings_on_one_machine_both_finish(workdir: Path, corpus: Path) -> None:
    """With no rendezvous endpoint in plan or environment, each launch meets on a free port."""
    outs = [emit(workdir, f"side_by_side_{i}", corpus) for i in range(2)]
    assert all("--standalone" in (out / "launch.sh").read_text() for out in outs)
    env = {k: v for k, v in os.environ.items() if k not in ("RDZV_ENDPOINT", "MASTER_PORT", "MASTER_ADDR")}
    env.update(TORCHRUN=f"{sys.executable} -m torch.distributed.run", OMP_NUM_THREADS="1")
    jobs = [subprocess.Popen(["bash", str(out / "launch.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True) for out in outs]
    logs = [job.communicate(timeout=300)[0] for job in jobs]
    for job, log in zip(jobs, logs):
        assert job.returncode == 0, log[-3000:]
    for out in outs:
        assert list(step_losses(out)) == list(range(1, 7))
