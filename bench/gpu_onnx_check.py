"""Run planc's ONNX artifacts (built beforehand by bench/prepare_gpu_checks.py) with ONNX
Runtime's CUDA provider, check them against the eager torch model on CUDA, and report latency
and tokens/s. Needs onnxruntime, numpy, torch and transformers, not planc.

    python3 bench/gpu_onnx_check.py bench/gpu_artifacts/onnx --results OUT/onnx.json

Providers are those of `providers = [auto]`, resolved by planc's own runtime module (read by
path): CUDAExecutionProvider when this onnxruntime build has it, else CPUExecutionProvider (the
fallback, which the report names; the GPU machine's onnxruntime 1.30 is the CPU build, so there
it shows the fallback and the eager reference still runs on CUDA).

Artifacts, one folder each with a manifest.json:
- decoder:  planc's int4 decoder (MatMulNBits, key/value cache): the prompt's logits and a
            greedy continuation, step by step through the cache, against the eager GPT's
            logits of the same tokens; decode tokens/s of a plain session.run loop
            (planc's own DecoderSession binds the cache in place and runs faster, but it
            imports planc).
- logits:   the GPT as an fp16 graph (the cast pass; a decode target takes no cast): logits
            of a batch against the eager GPT; latency and tokens/s of one forward.
- encoder:  all-MiniLM-L6-v2 at int8 / fp16: mean-pooled sentence embeddings against eager
            BertModel; latency at batch 1, seq 128.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]


def planc_runtime_module():
    """planc's backends/onnx/runtime.py (numpy and onnxruntime only), for `[auto]`'s resolution."""
    spec = importlib.util.spec_from_file_location("planc_onnx_runtime", REPO / "backends" / "onnx" / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_ms(fn, runs: int, sync: bool) -> float:
    """Median milliseconds of `fn` after three warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def load_reference(folder: Path, device: torch.device) -> torch.nn.Module:
    """The eager fp32 model a manifest's `reference` folder describes (reference.json + weights)."""
    spec = json.loads((folder / "reference.json").read_text())
    packed = folder / "weights.pt.gz"
    with (gzip.open(packed) if packed.is_file() else open(folder / "weights.pt", "rb")) as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if spec["kind"] == "gpt":
        sys.path.insert(0, str(folder))
        try:
            from gpt import gpt  # the factory file carried beside the weights
        finally:
            sys.path.remove(str(folder))
        model = gpt(**spec["args"])
    else:
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig.from_dict(spec["config"]), add_pooling_layer=False)
        rows = state.pop("embeddings.word_embeddings.rows")  # only the rows the check sentences use
        table = torch.zeros_like(model.embeddings.word_embeddings.weight)
        table[rows] = state.pop("embeddings.word_embeddings.weight").float()
        state["embeddings.word_embeddings.weight"] = table
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=spec["kind"] == "gpt")
    return model.eval().to(device)


def check_decoder(session: ort.InferenceSession, manifest: dict, reference: torch.nn.Module,
                  device: torch.device) -> dict:
    """Prefill the prompt, then greedy steps through the cache; every step's logits against the
    eager model's logits of the same tokens."""
    spec = manifest["decoder"]
    prompt = np.array([manifest["prompt_ids"]], np.int64)
    new = manifest["new_tokens"]
    names = [o.name for o in session.get_outputs()]
    # A graph with `logits_to_keep` must be fed it (0: logits of every position).
    keep = {"logits_to_keep": np.zeros(1, np.int64)} if any(
        i.name == "logits_to_keep" for i in session.get_inputs()) else {}

    def run_all() -> tuple[list[np.ndarray], list[int]]:
        length = prompt.shape[1]
        slots = length + new if spec["kv_buffer"] == "shared" else 0
        feeds = {"input_ids": prompt, "attention_mask": np.ones((1, length), np.int64),
                 "position_ids": np.arange(length, dtype=np.int64)[None]}
        for i, heads in enumerate(spec["kv_heads"]):
            feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros(
                (1, heads, slots, spec["head_dim"]), np.float32)
        out = dict(zip(names, session.run(None, feeds | keep)))
        logits, tokens = [out["logits"][0]], []
        for _ in range(new):
            tokens.append(int(logits[-1][-1].argmax()))
            feeds = {"input_ids": np.array([[tokens[-1]]], np.int64),
                     "attention_mask": np.ones((1, length + 1), np.int64),
                     "position_ids": np.array([[length]], np.int64)}
            feeds.update({n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")})
            out = dict(zip(names, session.run(None, feeds | keep)))
            logits.append(out["logits"][0])
            length += 1
        return logits, tokens

    start = time.perf_counter()
    logits, tokens = run_all()
    seconds = time.perf_counter() - start
    got = np.concatenate(logits[:-1])  # the prompt's positions, then one per fed token
    ids = torch.tensor([manifest["prompt_ids"] + tokens[:-1]], device=device)
    with torch.no_grad():
        want = reference(ids)[0].float().cpu().numpy()
    best = []
    for _ in range(3):  # decode tokens/s: the whole greedy loop, best of three
        start = time.perf_counter()
        run_all()
        best.append(time.perf_counter() - start)
    return {
        "positions": len(got),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "logit_scale": float(np.abs(want).max()),
        "tokens_per_s": new / min(best + [seconds]),
    }


def check_logits(session: ort.InferenceSession, manifest: dict, reference: torch.nn.Module,
                 device: torch.device, on_gpu: bool) -> dict:
    ids = np.array(manifest["input_ids"], np.int64)
    got = session.run(None, {"input_ids": ids})[0].astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(ids).to(device)).float().cpu().numpy()
    ms = timed_ms(lambda: session.run(None, {"input_ids": ids}), 20, on_gpu)
    return {
        "positions": int(ids.size),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "logit_scale": float(np.abs(want).max()),
        "latency_ms": ms,
        "tokens_per_s": ids.size / (ms / 1e3),
    }


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def check_encoder(session: ort.InferenceSession, manifest: dict, reference: torch.nn.Module,
                  device: torch.device, on_gpu: bool) -> dict:
    feeds = {k: np.array(v, np.int64) for k, v in manifest["inputs"].items()}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    got = session.run(None, feeds)[0].astype(np.float32)
    with torch.no_grad():
        hidden = reference(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()}).last_hidden_state
    mask = feeds["attention_mask"]
    cosines = (_mean_pool(got, mask) * _mean_pool(hidden.float().cpu().numpy(), mask)).sum(-1)
    # latency at batch 1, seq 128: the first sentence's tokens repeated (rows the reference carries)
    first = feeds["input_ids"][0][feeds["attention_mask"][0] == 1]
    one = {"input_ids": np.resize(first, 128)[None], "attention_mask": np.ones((1, 128), np.int64)}
    ms = timed_ms(lambda: session.run(None, one), 50, on_gpu)
    return {"sentences": len(mask), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
            "latency_ms": ms, "tokens_per_s": int(one["attention_mask"].sum()) / (ms / 1e3)}


def check_artifact(folder: Path, providers: list[str], device: torch.device) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with gzip.open(folder / "model.onnx.gz") as f:  # single-file models, gzipped to fit the carry limit
        session = ort.InferenceSession(f.read(), options, providers=providers)
    provider = session.get_providers()[0]
    reference = load_reference(folder.parent / manifest["reference"], device)
    on_gpu = provider == "CUDAExecutionProvider"
    if manifest["kind"] == "decoder":
        figures = check_decoder(session, manifest, reference, device)
    elif manifest["kind"] == "logits":
        figures = check_logits(session, manifest, reference, device, on_gpu)
    else:
        figures = check_encoder(session, manifest, reference, device, on_gpu)
    goal_key, goal = manifest["goal"]
    passed = figures[goal_key] >= goal
    return {"artifact": folder.name, "provider": provider, "reference_device": str(device),
            "goal": f"{goal_key} >= {goal}", "passed": passed, **figures}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, help="the onnx/ folder prepare_gpu_checks.py wrote")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--only", nargs="+", default=None, help="artifact folder names (a carry-sized subset)")
    args = parser.parse_args(argv)
    runtime = planc_runtime_module()
    available = ort.get_available_providers()
    providers = runtime.resolve_providers(["auto"], available)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    note = ("CUDAExecutionProvider" if providers[0] == "CUDAExecutionProvider" else
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: {', '.join(available)}): "
            "providers = [auto] fell back to CPUExecutionProvider; onnxruntime-gpu would run the artifacts on CUDA")
    print(f"providers = [auto] -> {providers}; eager reference on {device}\n{note}", flush=True)
    folders = sorted(p.parent for p in args.artifacts.glob("*/manifest.json"))
    if args.only:
        folders = [f for f in folders if f.name in args.only]
    rows = []
    for folder in folders:
        row = check_artifact(folder, providers, device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    results = {"onnxruntime": ort.__version__, "torch": torch.__version__, "available_providers": available,
               "providers": providers, "note": note,
               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["rows"] and all(r["passed"] for r in outcome["rows"]) else 1)
