"""int4 decode speed with fp32 vs int8 compute inside MatMulNBits (`accuracy_level` 0 vs 4).

One Llama-config decoder (8 layers, width 512, 8 query / 4 key-value heads, byte vocabulary,
seeded random weights), exported once as int4 by planc, then the same file with every
MatMulNBits set to int8 compute; both generate 32 tokens from a 32-byte prompt through planc's
generation loop, timed interleaved (median of `--rounds`), at batch 1 and 8, 2 threads.

    python bench/bench_int4_compute.py
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from planc.backends.onnx import int4_compute  # noqa: E402
from planc.backends.onnx.decoder import MODEL_FILE, export_decoder  # noqa: E402
from planc.backends.onnx.generate import DecoderSession, generate_ids  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory(prefix="bench-int4-compute-") as scratch:
        fp32 = Path(scratch) / "fp32"
        export_decoder(model, fp32, quantize="int4")
        int8 = Path(scratch) / "int8"
        shutil.copytree(fp32, int8)
        int4_compute.with_compute(fp32 / MODEL_FILE, int8 / MODEL_FILE, "int8")
        prompt = list(b"def main(argv):\n    return run(argv) + 1\n")[:32]
        print(f"{config.num_hidden_layers}-layer Llama config, int4, 32 new tokens, {args.threads} threads, "
              f"median of {args.rounds} interleaved rounds")
        for batch in (1, 8):
            sessions = {name: DecoderSession(d, threads=args.threads) for name, d in (("fp32 compute", fp32), ("int8 compute", int8))}
            seconds: dict[str, list[float]] = {name: [] for name in sessions}
            for session in sessions.values():
                generate_ids(session, [prompt] * batch, 32)  # warm-up
            for _ in range(args.rounds):
                for name, session in sessions.items():
                    started = time.perf_counter()
                    generate_ids(session, [prompt] * batch, 32)
                    seconds[name].append(time.perf_counter() - started)
            speed = {name: 32 * batch / sorted(times)[len(times) // 2] for name, times in seconds.items()}
            ratio = speed["int8 compute"] / speed["fp32 compute"]
            print(f"batch {batch}: " + ", ".join(f"{name} {value:.1f} tok/s" for name, value in speed.items()) + f" ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
