"""`target train { sweep { } }`: trials of the same program with values substituted, the one
with the lowest held-out loss kept and written into plan.resolved.

The slow test runs a 2 x 1 sweep of the tiny example GPT and checks the choice against the
held-out losses the trials' own programs logged (metrics.jsonl), not against planc's table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from train_helpers import REPO, small_corpus

from planc.backends.train.options import Sweep, TrainTarget
from planc.backends.train.sweep import Trial, table
from planc.compiler.explain import explain
from planc.compiler.validate import check_file

EXAMPLE = REPO / "examples" / "gpt_sweep.plan"


def test_combinations_and_trial_targets_substitute_the_swept_options() -> None:
    sweep = Sweep(lr=[1e-3, 3e-4], warmup=[10, 50], trial_steps=20)
    assert sweep.combinations() == [{"lr": 1e-3, "warmup": 10}, {"lr": 1e-3, "warmup": 50},
                                   {"lr": 3e-4, "warmup": 10}, {"lr": 3e-4, "warmup": 50}]
    base = TrainTarget(steps=200, sweep=sweep, regularize={"l1": 0.1}, dropout=0.1)
    trial = base.trial({"lr": 3e-4, "warmup": 50, "l1": 0.3, "dropout": 0.0}, steps=20)
    assert (trial.optimizer.lr, trial.schedule.warmup, trial.regularize.l1, trial.dropout) == (3e-4, 50, 0.3, 0.0)
    assert trial.steps == 20 and trial.sweep is None
    assert trial.optimizer.weight_decay == base.optimizer.weight_decay  # the rest is the plan's
    assert base.trial({"lr": 3e-4}).steps == 200


def test_table_lists_every_trial_and_marks_the_chosen_one(tmp_path: Path) -> None:
    trials = [Trial(1, {"lr": 1e-3}, tmp_path, 2.5, 3.0, "ok", 5.5), Trial(2, {"lr": 3e-4}, tmp_path, 2.1, 4.0, "ok", 5.5),
              Trial(3, {"lr": 1e-5}, tmp_path, None, 0.0, "failed: exit 1", None)]
    lines = table(trials, trials[1], ["lr"]).splitlines()
    assert lines[0].split() == ["trial", "lr", "held-out", "loss", "before", "seconds", "status"]
    assert lines[3].split()[:3] == ["2", "*", "0.0003"] and "2.1000" in lines[3]
    assert lines[4].split()[-3:] == ["failed:", "exit", "1"]


def test_example_plan_checks_and_explains_its_sweep() -> None:
    checked = check_file(EXAMPLE)
    assert checked.ok, checked.diagnostics
    sweep = checked.plan.target("train").options.sweep
    assert sweep.swept == {"lr": [3e-3, 1e-3, 3e-4], "warmup": [10, 50]} and sweep.parallel == 1
    assert "sweep { lr = [0.003, 0.001, 0.0003], warmup = [10, 50], parallel = 1, trial_steps = 60 }" in explain(checked.plan)


@pytest.mark.slow
def test_two_by_one_sweep_keeps_the_trial_with_the_lower_heldout_loss(tmp_path: Path) -> None:
    """The example plan on the tiny GPT: lr in {3e-3, 1e-5}, one warmup, both trials at once."""
    corpus = small_corpus(tmp_path, 120_000)
    text = EXAMPLE.read_text()
    replacements = {
        r"n_layer = 4, n_head = 4, d_model = 128": "n_layer = 2, n_head = 4, d_model = 64, max_seq = 64",
        r'"models/gpt\.py:gpt"': f'"{REPO / "examples" / "models" / "gpt.py"}:gpt"',
        r"world_size = 2": "world_size = 1",
        r"data \{ path = stdlib, seq_len = 128 \}": f'data {{ path = "{corpus}", seq_len = 32 }}',
        r"eval_sequences = 128": "eval_sequences = 32",
        r"sweep \{[^}]*\}": "sweep { lr = [3e-3, 1e-5], warmup = [5], trial_steps = 30, parallel = 2 }",
    }
    for pattern, new in replacements.items():
        text, count = re.subn(pattern, new, text)
        assert count == 1, pattern
    plan = tmp_path / "sweep.plan"
    plan.write_text(text)

    import planc

    out = tmp_path / "out"
    result = planc.compile(plan, out_dir=out)
    losses = {}
    for trial in sorted((out / "sweep").glob("trial-*")):
        events = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        evals = [e["eval_loss"] for e in events if e.get("event") == "eval"]
        assert any(e.get("step") == 30 and "loss" in e for e in events)  # the trial ran its 30 steps
        losses[trial.name] = evals[-1]
    assert len(losses) == 2 and min(losses.values()) < evals[0]  # the better trial learned something
    best_lr = 3e-3 if losses["trial-01"] < losses["trial-02"] else 1e-5
    resolved = (out / "plan.resolved").read_text()
    assert re.search(rf"optimizer {{ name = adamw, lr = {best_lr!r},", resolved), resolved
    assert "sweep {" not in resolved and "steps = 200" in resolved  # the full run, not a trial's
    assert check_file(out / "plan.resolved").ok
    report = json.loads((out / "sweep" / "sweep.json").read_text())
    assert report["chosen"]["values"] == {"lr": best_lr, "warmup": 5}
    assert result.report["sweep"]["chosen"]["eval_loss"] == pytest.approx(min(losses.values()))
    train_py = (out / "train.py").read_text()
    assert f'"lr": {best_lr!r}' in train_py and "STEPS = 200" in train_py
