"""The driver's graph stages through the CLI: every failure is a diagnostic at a plan line."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from planc.compiler.cli import main
ROOT = Path(__file__).resolve().parents[2]


def planc(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def plans(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "models", tmp_path / "models", ignore=shutil.ignore_patterns("gpt2_25m"))
    (tmp_path / "broken.py").write_text("def build(depth=1):\n    raise ValueError(f'depth {depth} is too deep')\n")
    return tmp_path


GPT = 'model gpt = factory("models/gpt.py:gpt", n_layer = 2, d_model = 64) { task = causal_lm }\n'


def test_selector_matching_nothing_is_an_error_at_its_span(plans: Path) -> None:
    plan = plans / "empty.plan"
    plan.write_text(GPT + 'select ffn = name("encoder.*")\npipeline {\n  prune ffn { sparsity = 50% }\n}\n')
    code, _, err = planc("compile", str(plan), "--emit", "fx-after:prune")
    assert code == 1 and "Traceback" not in err
    assert f"{plan}:4:9: error: selector matches no module" in err
    assert "'ffn' is defined at" in err


def test_factory_failure_points_at_the_model_line(plans: Path) -> None:
    plan = plans / "broken.plan"
    plan.write_text('pipeline { cast; }\nmodel m = factory("broken.py:build", depth = 7)\n')
    code, _, err = planc("compile", str(plan), "--emit", "fx")
    assert code == 1 and f"{plan}:2:1: error: model 'm'" in err and "depth 7 is too deep" in err


def test_emit_after_a_pass_prints_the_rewritten_graph(plans: Path) -> None:
    plan = plans / "prune.plan"
    plan.write_text(GPT + "pipeline {\n  prune Linear { method = nm }\n  cast { dtype = bf16 }\n}\n")
    code, out, err = planc("compile", str(plan), "--emit", "fx-after:prune")
    assert code == 0, err
    assert "def forward" in out and "bfloat16" not in out
    code, out, _ = planc("compile", str(plan), "--emit", "fx-after:cast")
    assert code == 0 and "bfloat16" in out
    code, _, err = planc("compile", str(plan), "--emit", "fx-after:quantize")
    assert code == 1 and "the pipeline has no pass 'quantize'" in err


def test_graph_stages_of_a_decoder_plan_print_its_cache_graph_and_write_nothing(plans: Path) -> None:
    """`--emit fx` stops after capture for every kind of plan, decoders included."""
    plan = plans / "decode.plan"
    plan.write_text(GPT + "pipeline { quantize Linear { scheme = int8 } }\n"
                    'target onnx { decode { max_new_tokens = 4 }, verify { metric = top1, goal = ">= 0.5" } }\n')
    out_dir = plans / "out"
    code, out, err = planc("compile", str(plan), "-o", str(out_dir), "--emit", "fx")
    assert code == 0, err
    assert "def forward" in out and "planc.linear_int8" not in out and "cat" in out  # the cache's concatenations
    code, out, err = planc("compile", str(plan), "-o", str(out_dir), "--emit", "fx-after:quantize")
    assert code == 0, err
    assert out.count("planc.linear_int8_dynamic.default(") == 2 * 6 + 1  # q, k, v, out, fc_in, fc_out per block; lm_head
    assert not out_dir.exists()


def test_compile_without_output_or_target_is_a_plan_error(plans: Path) -> None:
    plan = plans / "notarget.plan"
    plan.write_text(GPT)
    code, _, err = planc("compile", str(plan), "-o", str(plans / "out"))
    assert code == 1 and "the plan has no target" in err and not (plans / "out").exists()


def test_trained_weights_are_reused_when_only_the_onnx_target_changes(plans: Path, monkeypatch) -> None:
    """The weight cache is keyed by model, pipeline and training target: a new verify goal
    reuses the trained weights, a new training option trains again."""
    import importlib

    from planc.backends.train.target import TARGET as TRAIN
    from planc.compiler import driver
    from planc.compiler.validate import load_plan

    monkeypatch.setenv("PLANC_CACHE", str(plans / "cache"))
    runs: list[Path] = []

    def fake_launch(directory: Path, *args, **kwargs) -> int:
        runs.append(directory)
        (directory / "trained.pt").write_bytes(b"weights %d" % len(runs))
        return 0

    # the module, not the package's `launch` function of the same name
    monkeypatch.setattr(importlib.import_module("planc.backends.train.launch"), "launch", fake_launch)

    def weights(train: str, goal: str) -> bytes:
        plan_file = plans / "t.plan"
        plan_file.write_text(
            GPT + "pipeline { prune Linear { sparsity = 50% } }\n"
            f"target train {{ {train} }}\n"
            f'target onnx {{ verify {{ metric = max_abs, goal = "{goal}" }} }}\n'
        )
        plan, _ = load_plan(plan_file)
        job = driver.make_job(plan, plans / "out" / "train", progress=lambda *_: None)
        loaded = job.load()
        return TRAIN.trained_weights(job, plan.target("train"), job.resolve(loaded), loaded.task).read_bytes()

    first = weights("steps = 5", "<= 0.1")
    assert weights("steps = 5", "<= 0.5") == first and len(runs) == 1
    assert weights("steps = 6", "<= 0.1") != first and len(runs) == 2


def test_a_model_planc_cannot_serve_as_a_decoder_is_an_error_at_the_model_line(plans: Path) -> None:
    (plans / "lm.py").write_text(
        "import torch\n"
        "class LM(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb, self.head = torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256)\n"
        "    def forward(self, input_ids, attention_mask=None):\n"
        "        return self.head(self.emb(input_ids))\n"
        "def build():\n"
        "    return LM()\n"
    )
    plan = plans / "lm.plan"
    plan.write_text('model lm = factory("lm.py:build") { task = causal_lm }\n'
                    'target onnx { decode { max_new_tokens = 4 }, verify { metric = top1 } }\n')
    code, _, err = planc("compile", str(plan), "-o", str(plans / "out"))
    assert code == 1 and "Traceback" not in err and "internal error" not in err
    assert f"{plan}:1:1: error: model 'lm': cannot export LM as a decoder" in err
    assert not (plans / "out").exists()


def test_int4_decoder_compute_is_planned_from_the_cpu_and_verified_once(plans: Path) -> None:
    """`int4_compute = auto` on a decoder: int8 compute where the target CPU has integer dot
    products, fp32 elsewhere; only what was verified is listed, and the file holds the choice."""
    import json

    from planc.passes.cpu import int8_format

    for cpu in ("x86_vnni", "x86_avx2"):
        plan = plans / f"int4_{cpu}.plan"
        plan.write_text(GPT + "pipeline { quantize Linear { scheme = int4, group_size = 32 } }\n"
                        f'target onnx {{ cpu = {cpu}, decode {{ max_new_tokens = 4 }}, verify {{ metric = top1, goal = ">= 0.3" }} }}\n')
        out = plans / f"out_{cpu}"
        code, _, err = planc("compile", str(plan), "-o", str(out))
        assert code == 0, err
        choice = json.loads((out / "report.json").read_text())["int4_compute"]
        expected = "int8" if int8_format(cpu).cpu == "x86_vnni" else "fp32"
        assert choice["requested"] == "auto" and choice["chosen"] == expected
        assert set(choice["verified"]) == {expected} and choice["verified"][expected]["passed"] is True
        import onnx

        levels = {a.i for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {choice["accuracy_level"]} == {4 if expected == "int8" else 0}


def test_mixed_precision_keeps_int4_where_the_goal_allows(plans: Path) -> None:
    """`fallback = int8`: the resolved plan names the int4 and int8 layers, the artifact meets its goal."""
    import json

    import onnx

    data = ROOT / "examples" / "data"
    plan = plans / "mixed.plan"
    plan.write_text(GPT + "pipeline {\n  quantize Linear {\n    scheme = int4, group_size = 16, fallback = int8\n"
                    f'    calibration = "{data / "sentences.txt"}", calibration_samples = 8\n  }}\n}}\n'
                    f'target onnx {{ verify {{ metric = cosine, goal = ">= 0.999", data = "{data / "dev_sentences.txt"}", samples = 8 }}, '
                    "bench { runs = 3, seq = 32 } }\n")
    code, _, err = planc("compile", str(plan), "-o", str(plans / "out"))
    assert code == 0, err
    report = json.loads((plans / "out" / "report.json").read_text())
    precision = next(p for p in report["passes"] if p["name"] == "mixed precision")
    layers = set(precision["int4"]) | set(precision["int8"])
    assert len(layers) == 2 * 6 + 1 and set(precision["sensitivity"]) == layers
    # 2 samples rank the layers; the other 6, in two folds, check each candidate built on the
    # other fold, against the goal tightened by the default margin; the choice met it there,
    # and the gate on held-out data.
    assert precision["samples"] == {"rank": 2, "check": 6, "folds": [3, 3]}
    assert precision["search_goal"] == ">= 0.99925" and precision["check_met"] is True
    assert precision["check_value"] >= 0.99925
    assert report["accuracy"]["passed"] is True and report["accuracy"]["value"] >= 0.999
    passes = [p for p in report["passes"] if p["name"] == "quantize"]
    assert len(passes) >= 1 and all(p["seconds"] > 0 for p in passes)
    # the whole compile: the search, the passes, export, verification and the bench
    assert report["compile_seconds"] >= precision["seconds"] + sum(p["seconds"] for p in passes)
    resolved = (plans / "out" / "plan.resolved").read_text()
    assert resolved.count("quantize ") == (2 if precision["int4"] and precision["int8"] else 1)
    assert "fallback" not in resolved and all(f'name("{layer}")' in resolved for layer in layers)
    nbits = [n for n in onnx.load(str(plans / "out" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(precision["int4"])


def test_explain_prints_the_searched_split(plans: Path) -> None:
    """`planc explain` says a fallback step is searched at compile time; `--passes` searches and
    prints the plan it resolves to: an int4 step and an int8 step over explicit layers."""
    data = ROOT / "examples" / "data"
    plan = plans / "mixed.plan"
    plan.write_text(GPT + "pipeline {\n  quantize Linear {\n    scheme = int4, group_size = 16, fallback = int8\n"
                    f'    calibration = "{data / "sentences.txt"}", calibration_samples = 8\n  }}\n}}\n'
                    f'target onnx {{ verify {{ metric = cosine, goal = ">= 0.95", data = "{data / "dev_sentences.txt"}" }} }}\n')
    code, out, err = planc("explain", str(plan))
    assert code == 0, err
    assert "fallback = int8" in out and "# fallback = int8: which layers stay int4 is searched" in out
    code, out, err = planc("explain", "--passes", str(plan))
    assert code == 0, err
    assert "fallback" not in out.split("target onnx")[0]
    assert "scheme = int4" in out and 'name("blocks.' in out and "passes" in out


def test_mixed_precision_needs_a_goal(plans: Path) -> None:
    plan = plans / "nogoal.plan"
    plan.write_text(GPT + 'pipeline { quantize Linear { scheme = int4, fallback = int8, calibration = "c.txt" } }\n'
                    "target onnx { }\n")
    (plans / "c.txt").write_text("hello\n")
    code, _, err = planc("check", str(plan))
    assert code == 1 and "fallback = int8 keeps int4 where the verify goal allows" in err and f"{plan}:2:" in err


def test_a_decoder_quantize_step_keeps_its_method_and_calibration(plans: Path) -> None:
    """The decode export runs the plan's whole quantize step (here GPTQ calibrated on stdlib windows)."""
    import json

    plan = plans / "gptq.plan"
    plan.write_text(GPT + "pipeline { quantize Linear { scheme = int4, group_size = 16, method = gptq,"
                    " calibration = stdlib, calibration_samples = 4 } }\n"
                    'target onnx { int4_compute = fp32, decode { max_new_tokens = 4 }, verify { metric = top1, goal = ">= 0.3" } }\n')
    code, out, err = planc("compile", str(plan), "-o", str(plans / "out"))
    assert code == 0, err
    report = json.loads((plans / "out" / "report.json").read_text())
    assert report["passes"][0]["summary"].startswith("gptq int4")
    assert report["decoder"]["quantization"] == "int4" and report["decoder"]["quantizer"] == "planc"
