"""int4 decode speed with fp32 vs int8 compute inside MatMulNBits (`accuracy_level` 0 vs 4).

One Llama-config decoder (8 layers, width 512, 8 query / 4 key-value heads, byte vocabulary,
seeded random weights), exported once as int4 by planc, then the same file with every
MatMulNBits set to int8 compute; both generate `--new-tokens` tokens from a 32-byte prompt
through planc's generation loop at batch 1 and 8, 2 threads, timed interleaved in a freshly
shuffled order every round (`timing.interleaved_medians`, median of `--rounds`). Results:
bench/results/int4_compute.md and .json (`--out`, `--json`).

    python bench/bench_int4_compute.py
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import results_file  # noqa: E402
from planc.backends.onnx import int4_compute  # noqa: E402
from planc.backends.onnx.decoder.exporter import MODEL_FILE, export_decoder  # noqa: E402
from planc.backends.onnx.decoder.generate import generate_ids  # noqa: E402
from planc.backends.onnx.decoder.session import DecoderSession  # noqa: E402
from planc.backends.onnx.timing import interleaved_medians  # noqa: E402

PROMPT = list(b"def main(argv):\n    return run(argv) + 1\n")[:32]
COMPUTES = ("fp32", "int8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    results_file.add_output_args(parser, "int4_compute")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    source = results_file.provenance(__file__, argv)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int4-compute-") as scratch:
        directories = {compute: Path(scratch) / compute for compute in COMPUTES}
        export_decoder(model, directories["fp32"], quantize="int4")
        shutil.copytree(directories["fp32"], directories["int8"])
        int4_compute.with_compute(directories["fp32"] / MODEL_FILE, directories["int8"] / MODEL_FILE, "int8")
        for batch in args.batch:
            sessions = {compute: DecoderSession(d, providers=["cpu"], threads=args.threads) for compute, d in directories.items()}
            runs = {compute: (lambda s=session: generate_ids(s, [PROMPT] * batch, args.new_tokens, eos_token_ids=[]))
                    for compute, session in sessions.items()}
            ms = interleaved_medians(runs, rounds=args.rounds)
            speed = {compute: args.new_tokens * batch / (ms[compute] / 1e3) for compute in COMPUTES}
            for compute in COMPUTES:
                rows.append({"compute": compute, "batch": batch, "ms": round(ms[compute], 2),
                             "tokens_per_s": round(speed[compute], 1), "vs_fp32": round(speed[compute] / speed["fp32"], 3)})

    params = sum(p.numel() for p in model.parameters())
    results = {"params": params, "layers": args.layers, "threads": args.threads, "new_tokens": args.new_tokens,
               "prompt_len": len(PROMPT), "rounds": args.rounds, "rows": rows}
    body = results_file.table(["MatMulNBits compute", "batch", "ms", "tok/s", "x fp32 compute"],
                              [[f"{r['compute']} (accuracy_level {0 if r['compute'] == 'fp32' else 4})", r["batch"],
                                f"{r['ms']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['vs_fp32']:.2f}"] for r in rows])
    title = (f"int4 decoder, fp32 vs int8 compute inside MatMulNBits: {args.layers}-layer Llama config "
             f"({params / 1e6:.1f}M params), prompt {len(PROMPT)}, {args.new_tokens} new tokens (prefill included)")
    print(body)
    results_file.write(args, title, source, results_file.interleaved_protocol(args.rounds, args.threads), body, results)
    return results


if __name__ == "__main__":
    main()
