"""The speed/accuracy frontier of compressed all-MiniLM-L6-v2, measured in one run.

Variants, all on the same inputs and the same threads:

- `eager fp32`: the Hugging Face model in torch (`torch.set_num_threads`);
- `ort fp32`: the plain export of the unmodified model on ONNX Runtime;
- `ort quantize_dynamic`: ORT's one-call `quantize_dynamic` of that export (per-channel int8);
- every planc artifact directory given on the command line (int8, int4, prune+distill+int8,
  layer-drop+distill+int8, ...), and every plan given with `--plan` (compiled here).

Speed: median latency at batch 1 / seq 128 and at batch 8 / seq 128 (real text, no padding).
Every ORT session has `session.intra_op.allow_spinning = 0` and the same thread count, and
torch runs `torch.set_num_threads(threads)` with `OMP_WAIT_POLICY=PASSIVE` (unless set): no
variant spins, and on a shared machine a spinning OpenMP barrier can make eager torch ten times
slower than it is. Each round runs all variants once in a freshly shuffled order, so a
neighbour's load hits all alike; the median over >= 30 rounds is kept.

Accuracy, against the ORIGINAL model (eager fp32) on `examples/data/test_sentences.txt` (the test set),
which no stage ever trains or calibrates on: min and mean cosine of the sentence embeddings,
and the Spearman correlation of the pairwise cosine similarities over all sentence pairs.

Writes `bench/results/minilm_frontier.md` (table), `.json` (rows) and `.png` (speed vs accuracy).

    python bench/bench_minilm_frontier.py out/minilm_int8 out/minilm_int4 \
        out/minilm_prune_distill_int8/onnx out/minilm_layerdrop_distill_int8/onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP: before `import torch`

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planc.backends.onnx import runtime  # noqa: E402
from planc.backends.onnx.artifact import MODEL_FILE, _bench_inputs, load_report  # noqa: E402
from planc.backends.onnx.export import files_size  # noqa: E402
from planc.backends.onnx.timing import interleaved_medians, torch_threads  # noqa: E402
from bench.minilm_common import compile_plans, export_fp32, minilm_source, ort_quantize_dynamic  # noqa: E402
from planc.compiler import model as model_source  # noqa: E402
from planc.compiler.evaluate import Agreement, agreement, read_sentences  # noqa: E402

#: Published figures come from the test set (options were chosen on dev_sentences.txt).
TEST = REPO / "examples" / "data" / "test_sentences.txt"
RESULTS = REPO / "bench" / "results"
CPU = ["CPUExecutionProvider"]
SHAPES = ((1, 128), (8, 128))
#: Targets drawn on the plot, (speedup at batch 1, floor) per metric: prune+distill+int8 >= 3x at
#: min cosine and Spearman >= 0.95; layer-drop+distill+int8 >= 4x at min cosine >= 0.85, Spearman >= 0.95.
GOALS = {"min_cosine": ((3.0, 0.95), (4.0, 0.85)), "spearman": ((3.0, 0.95), (4.0, 0.95))}


def build_baselines(loaded, directory: Path) -> dict[str, Path]:
    """The fp32 export of the unmodified model and ORT's quantize_dynamic of it (per-channel)."""
    fp32 = export_fp32(loaded, directory)
    return {"ort fp32": fp32,
            "ort quantize_dynamic": ort_quantize_dynamic(fp32, directory / "quantize_dynamic.onnx", per_channel=True)}


def session_embedder(loaded, session) -> Callable[[list[str]], np.ndarray]:
    """texts -> mean-pooled, normalized embeddings of an ORT session (padded batches)."""

    def embed(texts: list[str]) -> np.ndarray:
        inputs = loaded.tokenizer.encode_batch(texts)
        hidden = next(iter(runtime.run(session, runtime.feeds_for(session, inputs)).values())).astype(np.float64)
        mask = inputs["attention_mask"].numpy()[..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return embed


def embed_all(embed: Callable[[list[str]], np.ndarray], texts: list[str], batch: int = 16) -> np.ndarray:
    return np.concatenate([embed(texts[i : i + batch]) for i in range(0, len(texts), batch)])


def describe(directory: Path) -> str:
    """What an artifact's passes did, from its report (e.g. 'prune, prune, quantize')."""
    try:
        passes = load_report(directory).get("passes", [])
    except FileNotFoundError:
        return ""
    return ", ".join(p.get("name", "?") for p in passes)


def measure(args: argparse.Namespace) -> dict:
    loaded = model_source.load_model(minilm_source("bench_minilm_frontier.py"))
    texts = read_sentences(args.sentences)
    with tempfile.TemporaryDirectory(prefix="bench-frontier-") as scratch:
        models = build_baselines(loaded, Path(scratch))
        models.update(compile_plans(args.plan, Path(scratch)))
        notes = {}
        for directory in map(Path, args.artifacts):
            name = f"planc {directory.name if directory.name != 'onnx' else directory.parent.name}"
            models[name] = directory / MODEL_FILE
            notes[name] = describe(directory)
        sessions = {name: runtime.create_session(path, CPU, args.threads) for name, path in models.items()}

        with torch_threads(args.threads), torch.inference_mode():
            reference = embed_all(
                lambda t: model_source.embed(loaded.model(**loaded.tokenizer.encode_batch(t)),
                                         loaded.tokenizer.encode_batch(t)["attention_mask"]).numpy(), texts)
            accuracy: dict[str, Agreement] = {"eager fp32": agreement(reference, reference)}
            for name, session in sessions.items():
                accuracy[name] = agreement(reference, embed_all(session_embedder(loaded, session), texts))

            latency: dict[tuple[int, int], dict[str, float]] = {}
            for batch, seq in SHAPES:
                inputs = _bench_inputs(loaded, batch, seq)
                calls: dict[str, Callable[[], object]] = {"eager fp32": lambda i=inputs: loaded.model(**i)}
                for name, session in sessions.items():
                    feeds = runtime.feeds_for(session, inputs)
                    calls[name] = (lambda s, f: lambda: s.run(None, f))(session, feeds)
                print(f"timing {len(calls)} variants at batch {batch} / seq {seq}, {args.rounds} rounds ...", file=sys.stderr)
                latency[(batch, seq)] = interleaved_medians(calls, rounds=args.rounds)

        rows = []
        for name in ["eager fp32", *sessions]:
            row = {
                "variant": name,
                "passes": notes.get(name, ""),
                "size_mb": None if name == "eager fp32" else round(files_size(models[name]) / 1e6, 2),
            }
            for (batch, seq), medians in latency.items():
                row[f"ms_b{batch}"] = round(medians[name], 3)
                row[f"speedup_b{batch}"] = round(medians["eager fp32"] / medians[name], 2)
            row.update({"min_cosine": round(accuracy[name].min_cosine, 4), "mean_cosine": round(accuracy[name].mean_cosine, 4),
                        "spearman": round(accuracy[name].spearman, 4)})
            rows.append(row)
    return {
        "model": "all-MiniLM-L6-v2",
        "threads": args.threads,
        "rounds": args.rounds,
        "shapes": [list(s) for s in SHAPES],
        "sentences": {"file": str(Path(args.sentences).relative_to(REPO) if Path(args.sentences).is_relative_to(REPO) else args.sentences),
                      "count": len(texts), "pairs": len(texts) * (len(texts) - 1) // 2},
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# {result['model']}: speed vs accuracy",
        "",
        f"Median latency over {result['rounds']} interleaved rounds (shuffled order each round), "
        f"{result['threads']} threads, ORT sessions without spinning; measured {result['when']}. "
        f"Accuracy against the original model (eager fp32) on {result['sentences']['count']} held-out sentences "
        f"(`{result['sentences']['file']}`, never trained or calibrated on): min/mean cosine of the sentence "
        f"embeddings and the Spearman correlation of all {result['sentences']['pairs']} pairwise similarities.",
        "",
        "| variant | passes | size MB | ms b1/s128 | speedup b1 | ms b8/s128 | speedup b8 | min cos | mean cos | Spearman |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        size = "-" if row["size_mb"] is None else f"{row['size_mb']:.1f}"
        lines.append(
            f"| {row['variant']} | {row['passes'] or '-'} | {size} | {row['ms_b1']:.2f} | {row['speedup_b1']:.2f}x | "
            f"{row['ms_b8']:.2f} | {row['speedup_b8']:.2f}x | {row['min_cosine']:.4f} | {row['mean_cosine']:.4f} | "
            f"{row['spearman']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, metric, label in ((axes[0], "min_cosine", "min cosine vs original"), (axes[1], "spearman", "similarity Spearman vs original")):
        for row in rows:
            axis.scatter(row["speedup_b1"], row[metric], s=40)
            axis.annotate(row["variant"].removeprefix("planc "), (row["speedup_b1"], row[metric]),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
        for speedup, floor in GOALS[metric]:  # the done-when corners: right of and above
            axis.plot([speedup, speedup, axis.get_xlim()[1]], [1.0, floor, floor], ls="--", lw=0.8, color="grey")
        axis.set_xlabel("speedup vs eager fp32 (batch 1, seq 128)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    fig.suptitle(f"{result['model']}: speed vs accuracy on held-out sentences ({result['threads']} threads)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="*", help="planc ONNX artifact directories")
    parser.add_argument("--plan", action="append", default=[], help="compile this plan and include its artifact")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", default=str(TEST))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for minilm_frontier.{md,json,png}")
    args = parser.parse_args(argv)
    if args.rounds < 30:
        parser.error("the protocol takes the median of at least 30 rounds")
    logging.basicConfig(level=logging.WARNING)
    result = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    write_atomically(args.out / "minilm_frontier.md", table)
    write_atomically(args.out / "minilm_frontier.json", json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "minilm_frontier.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
