"""Benchmark planc's MiniLM artifacts against what a user would write by hand, in one run.

Variants, all on the same inputs and the same 2 threads:

- `eager fp32`: the Hugging Face model in torch (`torch.set_num_threads`);
- `ort fp32`: the plain dynamo export of the unmodified model on ONNX Runtime;
- `quantize_dynamic`: ORT's one-call `onnxruntime.quantization.quantize_dynamic` of that export,
  with its defaults (per-tensor int8 weights) and with `per_channel=True`;
- every planc artifact directory given on the command line, and every plan given with
  `--plan` (compiled here through the planc driver).

Protocol: every ORT session has `session.intra_op.allow_spinning = 0`; each round runs all
variants once in a freshly shuffled order (so load from neighbours hits all alike) and the
median over rounds is kept. Accuracy is the cosine between each variant's sentence embedding
(mean-pooled, normalized) and eager's, one sentence per run, over the bundled sentences, and the
Spearman correlation of all pairwise sentence similarities against eager's.

    python bench/bench_minilm.py out/minilm-int8 out/minilm-int4
    python bench/bench_minilm.py --plan examples/minilm_int8.plan --rounds 50 --json bench.json
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planc.backends.onnx import runtime  # noqa: E402
from planc.backends.onnx.artifact import MODEL_FILE, _bench_inputs  # noqa: E402
from planc.backends.onnx.export import files_size  # noqa: E402
from planc.backends.onnx.timing import interleaved_medians, torch_threads  # noqa: E402
from planc.backends.onnx.verify import similarity_spearman  # noqa: E402
from bench.minilm_common import compile_plans, export_fp32, minilm_source, ort_quantize_dynamic  # noqa: E402
from planc.compiler import model as model_source  # noqa: E402

SENTENCES = REPO / "examples" / "data" / "sentences.txt"
CPU = ["CPUExecutionProvider"]


def build_baselines(loaded, directory: Path) -> dict[str, Path]:
    """The fp32 export and ORT's quantize_dynamic of it (per-tensor default, per-channel)."""
    fp32 = export_fp32(loaded, directory)
    return {
        "ort fp32": fp32,
        "quantize_dynamic": ort_quantize_dynamic(fp32, directory / "qd_tensor.onnx", per_channel=False),
        "quantize_dynamic per-channel": ort_quantize_dynamic(fp32, directory / "qd_channel.onnx", per_channel=True),
    }


def embeddings(call, loaded, texts: list[str]) -> np.ndarray:
    rows = []
    for text in texts:
        inputs = loaded.tokenizer.encode_batch([text])
        hidden = call(inputs)[0]
        pooled = hidden.mean(0)
        rows.append(pooled / np.linalg.norm(pooled))
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="*", help="planc ONNX artifact directories")
    parser.add_argument("--plan", action="append", default=[], help="compile this plan and include its artifact")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sentences", default=str(SENTENCES))
    parser.add_argument("--count", type=int, default=32, help="sentences used for accuracy")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    loaded = model_source.load_model(minilm_source("bench_minilm.py"))
    texts = [line.strip() for line in Path(args.sentences).read_text(encoding="utf-8").splitlines() if line.strip()][: args.count]
    with tempfile.TemporaryDirectory(prefix="bench-minilm-") as scratch:
        models = build_baselines(loaded, Path(scratch))
        models.update(compile_plans(args.plan, Path(scratch)))
        for directory in args.artifacts:
            models[f"planc {Path(directory).name}"] = Path(directory) / MODEL_FILE

        sessions = {name: runtime.create_session(path, CPU, args.threads) for name, path in models.items()}
        bench_inputs = _bench_inputs(loaded, args.batch, args.seq)
        calls = {"eager fp32": lambda: loaded.model(**bench_inputs)}
        for name, session in sessions.items():
            feeds = runtime.feeds_for(session, bench_inputs)
            calls[name] = (lambda s, f: lambda: s.run(None, f))(session, feeds)
        print(f"timing {len(calls)} variants, {args.rounds} interleaved rounds ...", file=sys.stderr)
        with torch_threads(args.threads), torch.inference_mode():
            medians = interleaved_medians(calls, rounds=args.rounds)
            reference = embeddings(lambda x: loaded.model(**x).last_hidden_state.numpy(), loaded, texts)

        rows = []
        fp32_bytes = files_size(models["ort fp32"])
        for name in calls:
            if name == "eager fp32":
                size, got = None, reference
            else:
                session = sessions[name]
                size = files_size(models[name])
                got = embeddings(lambda x, s=session: next(iter(runtime.run(s, x).values())), loaded, texts)
            cosines = (got * reference).sum(-1)
            rows.append(
                {
                    "variant": name,
                    "size_mb": None if size is None else round(size / 1e6, 2),
                    "size_vs_fp32": None if size is None else round(size / fp32_bytes, 3),
                    "latency_ms": round(medians[name], 3),
                    "speedup_vs_eager": round(medians["eager fp32"] / medians[name], 2),
                    "vs_quantize_dynamic": round(medians[name] / medians["quantize_dynamic"], 3),
                    "vs_quantize_dynamic_per_channel": round(medians[name] / medians["quantize_dynamic per-channel"], 3),
                    "cosine_min": round(float(cosines.min()), 4),
                    "cosine_mean": round(float(cosines.mean()), 4),
                    "spearman": round(similarity_spearman(got, reference), 4),
                }
            )

    from rich.console import Console
    from rich.table import Table

    title = f"all-MiniLM-L6-v2, batch {args.batch}, seq {args.seq}, {args.threads} threads, median of {args.rounds} interleaved rounds; cosine over {len(texts)} sentences"
    table = Table(title=title)
    headers = ["variant", "size MB", "x fp32 size", "ms", "speedup vs eager", "x quantize_dynamic", "x qd per-channel", "cos min", "cos mean", "Spearman"]
    for header in headers:
        table.add_column(header, justify="left" if header == "variant" else "right")
    for row in rows:
        table.add_row(*("-" if value is None else str(value) for value in row.values()))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
