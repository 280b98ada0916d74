"""Multi-head vs grouped-query attention on the trained example GPT, in one run.

The plan is `examples/gpt_share_gqa.plan` (share { kv_heads = 2 }, 200 steps of uptraining by
distillation from the original, fp32 decoder), compiled against `--teacher`, the multi-head GPT
that `planc compile examples/gpt_decode_int8.plan -o out/gpt_int8` trains. Four models:

- MHA: the teacher as it is (4 key/value heads per layer);
- GQA pooled: `share` alone, before any training;
- GQA uptrained: the example plan's result;
- MHA + the same training (`--control`): the teacher trained on with the example's recipe
  (distilled from itself), so that the GQA figure is not read against a less-trained model.

Reported: the key/value-cache bytes per token of each decoder artifact (its report), held-out
perplexity of the eager models on the training program's held-out split of the standard
library (the first 256 windows of 128 bytes, never trained on) and of the ONNX artifacts on
examples/models/gpt.py (the plan's `heldout`), and decode tokens/s of the artifacts, timed
interleaved in one process: decode tok/s = batch * (N - 1) / (t(N new tokens) - t(1 new token)),
median of `--repeats`, after a 128-byte prompt (so attention reads 129..256 cached positions).

    python bench/bench_share.py [--teacher out/gpt_int8/train/gpt_stdlib.pt] [--control]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from planc.backends.onnx.decoder.generate import generate_ids  # noqa: E402
from planc.backends.onnx.decoder.session import DecoderSession  # noqa: E402
from planc.backends.train import planc_runtime as rt  # noqa: E402
from planc.compiler.driver import compile_plan  # noqa: E402
from planc.passes.share.gqa import share_kv_heads  # noqa: E402

EXAMPLE = REPO / "examples" / "gpt_share_gqa.plan"
GPT = REPO / "examples" / "models" / "gpt.py"
#: The example's `data` block, as the training program reads it (its held-out split).
DATA = {"path": "stdlib", "glob": "*.py", "tokenizer": "bytes", "seq_len": 128, "max_bytes": 4_000_000, "heldout": 0.02}


def plans(teacher: Path) -> dict[str, str]:
    """The example plan on `teacher`, and its variants, as plan texts with absolute paths."""
    text = EXAMPLE.read_text()
    text = text.replace('factory("models/gpt.py:gpt"', f'factory("{GPT}:gpt"')
    text = re.sub(r'checkpoint = "[^"]*"', f'checkpoint = "{teacher}"', text)
    text = text.replace('heldout = "models/gpt.py"', f'heldout = "{GPT}"')
    model = text[: text.index("pipeline {")]
    pipeline = text[text.index("pipeline {") : text.index("target train")]
    train = text[text.index("target train") : text.index("target onnx")]
    onnx = text[text.index("target onnx") :]
    return {
        "mha": model + onnx,
        "gqa_pooled": model + pipeline + onnx,
        "gqa": text,
        "mha_control": model + train.replace('save = "gpt_gqa.pt"', 'save = "gpt_mha.pt"') + onnx,
    }


def heldout_perplexity(model: torch.nn.Module, rows: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token cross-entropy) over the held-out windows."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            ids = rows[i : i + batch]
            logits = model(ids[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def decode_speed(artifacts: dict[str, Path], prompt: list[int], batch: int, new: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of each artifact (module docstring), timed interleaved."""
    sessions = {name: DecoderSession(path, threads=2) for name, path in artifacts.items()}
    prompts = [prompt] * batch
    times: dict[str, dict[int, list[float]]] = {name: {1: [], new: []} for name in sessions}
    for session in sessions.values():
        generate_ids(session, prompts, new)  # warm-up
    for _ in range(repeats):
        for name, session in sessions.items():
            for count in (1, new):
                started = time.perf_counter()
                generate_ids(session, prompts, count)
                times[name][count].append(time.perf_counter() - started)
    return {name: batch * (new - 1) / (statistics.median(t[new]) - statistics.median(t[1])) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=REPO / "out" / "gpt_int8" / "train" / "gpt_stdlib.pt")
    parser.add_argument("--control", action="store_true", help="also train the MHA teacher on with the same recipe")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "share_gqa.md")
    parser.add_argument("--work", type=Path, default=None, help="where the artifacts go (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    teacher = args.teacher.resolve()
    if not teacher.is_file():
        sys.exit(f"{teacher} not found: compile examples/gpt_decode_int8.plan -o out/gpt_int8 first, or pass --teacher")

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_share_"))
    names = ["mha", "gqa_pooled", "gqa"] + (["mha_control"] if args.control else [])
    reports, trained = {}, {}
    for name in names:
        plan = work / f"{name}.plan"
        plan.write_text(plans(teacher)[name])
        started = time.perf_counter()
        result = compile_plan(plan, work / name)
        onnx_dir = work / name / "onnx" if (work / name / "onnx").is_dir() else work / name
        reports[name] = json.loads((onnx_dir / "report.json").read_text())
        reports[name]["dir"] = onnx_dir
        saved = next((work / name / "train").glob("*.pt"), None) if (work / name / "train").is_dir() else None
        trained[name] = saved
        print(f"{name}: compiled in {time.perf_counter() - started:.0f} s -> {result.artifact}", flush=True)

    from planc.compiler.model_source import import_factory

    gpt = import_factory(str(GPT), REPO)[0].gpt
    models = {"mha": gpt(n_layer=4, n_head=4, d_model=128, checkpoint=str(teacher))}
    models["gqa_pooled"] = copy.deepcopy(models["mha"])
    share_kv_heads(models["gqa_pooled"], 2)
    models["gqa"] = copy.deepcopy(models["gqa_pooled"])
    models["gqa"].load_state_dict(torch.load(trained["gqa"], weights_only=True))
    if args.control:
        models["mha_control"] = gpt(n_layer=4, n_head=4, d_model=128, checkpoint=str(trained["mha_control"]))
    _, heldout = rt.load_token_corpus(DATA, {}, REPO)
    rows = heldout[:256]
    ppl = {name: heldout_perplexity(model.eval(), rows) for name, model in models.items()}

    prompt = list(rows[0][:128].tolist())
    timed = {n: reports[n]["dir"] for n in names if n != "gqa_pooled"}
    speed = {batch: decode_speed(timed, prompt, batch, 128, args.repeats) for batch in args.batches}

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    label = {"mha": "MHA (4 kv heads), teacher", "gqa_pooled": "GQA (2 kv heads), pooled, no training",
             "gqa": "GQA (2 kv heads), uptrained 200 steps", "mha_control": "MHA + the same 200 steps"}
    lines = [
        f"# share {{ kv_heads = 2 }} on the trained example GPT ({cpu}, {os.cpu_count()} cores, 2 threads)",
        "",
        f"`python bench/bench_share.py{' --control' if args.control else ''}`: examples/gpt_share_gqa.plan on the "
        "teacher trained by examples/gpt_decode_int8.plan (4 layers, 4 heads of 32, d_model 128, byte vocab), fp32 "
        "decoders. Perplexity per byte: the standard library's held-out windows (256 x 128 bytes, never trained on) "
        "with the eager model, and examples/models/gpt.py with the ONNX artifact. Decode tok/s after a 128-byte "
        f"prompt, 128 new tokens, median of {args.repeats} interleaved runs.",
        "",
        "| model | KV cache bytes/token | held-out ppl (stdlib) | ppl gpt.py (ONNX) | "
        + " | ".join(f"decode tok/s b={b}" for b in args.batches) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(args.batches),
    ]
    for name in names:
        report = reports[name]
        speeds = [f"{speed[b][name]:.0f}" if name in speed[b] else "(as GQA)" for b in args.batches]
        lines.append(f"| {label[name]} | {report['decoder']['kv_cache_bytes_per_token']:,} | {ppl[name]:.3f} | "
                     f"{report['accuracy']['ppl_onnx']:.3f} | " + " | ".join(speeds) + " |")
    if args.control:
        lines += ["", "The two MHA rows have the same architecture and cache: the spread of their tok/s is this run's noise. "
                  "Attention is a small share of this model's decode step, so halving the cache moves tok/s by little "
                  "more than that; its gain is memory (bytes/token x context x batch)."]
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({
        "cpu": cpu, "perplexity_stdlib": ppl, "speed": {str(b): s for b, s in speed.items()},
        "reports": {n: {k: v for k, v in r.items() if k != "dir"} for n, r in reports.items()},
    }, indent=2, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
