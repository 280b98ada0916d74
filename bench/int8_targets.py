"""An int8 plan's accuracy for each target CPU, on this CPU and emulated on the other one.

For every target (`x86_vnni`: full-range int8 weights, `x86_avx2`: 7-bit weights) the plan's
passes run with that target, and the resulting graph is scored against the eager model on the
held-out sentences three ways:

- `ORT here`: the exported ONNX model on this machine's ONNX Runtime (its real kernels);
- `exact sums` / `AVX2 sums`: planc's reference ops with the arithmetic of a CPU whose integer
  sums are exact (VNNI, ARM) or saturate pairs to int16 (AVX2 without VNNI), so the figures of
  the CPU this machine is not are emulated, not guessed.

Scores: min and mean cosine of the sentence embeddings, and the Spearman correlation of all
pairwise sentence similarities (what a search or clustering user sees).

    python bench/int8_targets.py examples/minilm_int8.plan --sentences examples/data/test_sentences.txt
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planc.backends.onnx import runtime  # noqa: E402
from planc.backends.onnx.export import export_model, save_model  # noqa: E402
from planc.backends.onnx.optimize import optimize_graph  # noqa: E402
from planc.backends.onnx.verify import similarity_spearman  # noqa: E402
from planc.compiler import driver, model as model_source  # noqa: E402
from planc.compiler.validate import load_plan  # noqa: E402
import planc.passes.qops  # noqa: E402,F401  (registers torch.ops.planc)
from planc.passes.cpu import host_cpu  # noqa: E402

INT8_OPS = (torch.ops.planc.linear_int8_dynamic.default, torch.ops.planc.linear_int8_static.default)  # registered by qops


def with_cpu(plan, cpu: str):
    onnx = plan.target("onnx")
    target = onnx.model_copy(update={"options": onnx.options.model_copy(update={"cpu": cpu})})
    return plan.model_copy(update={"targets": tuple(target if t is onnx else t for t in plan.targets)})


def set_arithmetic(gm: torch.fx.GraphModule, saturate: bool) -> None:
    """Make every planc int8 op of `gm` sum like a CPU that does (not) saturate."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in INT8_OPS:
            index = 4 if node.target == INT8_OPS[0] else 6
            args = list(node.args) + [None] * (index + 1 - len(node.args))
            args[index] = saturate
            node.args = tuple(args)
    gm.recompile()


def embeddings(call, loaded, texts: list[str]) -> np.ndarray:
    rows = []
    for text in texts:
        inputs = loaded.tokenizer.encode_batch([text])
        rows.append(model_source.embed(call(inputs), inputs["attention_mask"]).numpy()[0])
    return np.stack(rows)


def scores(got: np.ndarray, reference: np.ndarray) -> str:
    cosines = (got * reference).sum(-1)
    return f"{cosines.min():.4f} / {cosines.mean():.4f} / {similarity_spearman(got, reference):.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan")
    parser.add_argument("--sentences", default=str(REPO / "examples/data/test_sentences.txt"), help="evaluation text (default: the test set)")
    parser.add_argument("--targets", nargs="+", default=["x86_avx2", "x86_vnni"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    plan, _ = load_plan(args.plan)
    texts = [line.strip() for line in Path(args.sentences).read_text(encoding="utf-8").splitlines() if line.strip()]
    captured = driver.capture_model(plan)
    loaded = captured.loaded
    with torch.no_grad():
        reference = embeddings(lambda x: loaded.model(**x), loaded, texts)
    print(f"{Path(args.plan).name}, {len(texts)} sentences of {Path(args.sentences).name}; this CPU: {host_cpu()}")
    print("min cosine / mean cosine / similarity Spearman against eager fp32")
    print(f"{'weights for':<12} {'ORT here':<26} {'exact sums (VNNI, ARM)':<26} {'AVX2 sums (no VNNI)':<26}")
    for cpu in args.targets:
        graph, _, _ = driver.run_pipeline(with_cpu(plan, cpu), driver.Captured(loaded, copy.deepcopy(captured.graph), captured.table))
        row = []
        with tempfile.TemporaryDirectory() as scratch:
            model = export_model(graph, loaded.example_inputs, loaded.dynamic_shapes)
            optimize_graph(model, fusions=True)
            save_model(model, Path(scratch) / "m.onnx")
            session = runtime.create_session(Path(scratch) / "m.onnx", ["CPUExecutionProvider"], 2)
            ort_outputs = lambda x: {k: torch.from_numpy(v) for k, v in runtime.run(session, x).items()}  # noqa: E731
            row.append(scores(embeddings(ort_outputs, loaded, texts), reference))
        for saturate in (False, True):
            set_arithmetic(graph, saturate)
            with torch.no_grad():
                row.append(scores(embeddings(lambda x: graph(**x), loaded, texts), reference))
        print(f"{cpu:<12} " + " ".join(f"{cell:<26}" for cell in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
