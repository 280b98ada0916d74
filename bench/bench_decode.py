"""Prefill and decode tokens/s of a decoder artifact on ONNX Runtime vs transformers' generate.

Both engines run the same weights, greedy, with a key/value cache, on the same prompts, in
one process, interleaved (ORT run, torch run, ORT run, ...) so that machine noise hits both
alike, with the same thread budget (torch.set_num_threads, ORT intra-op threads without
spinning; OMP_WAIT_POLICY=PASSIVE for torch). Each figure is measured the same way for both engines:

    prefill tok/s = batch * prompt_len / t(1 new token)
    decode  tok/s = batch * (N - 1) / (t(N new tokens) - t(1 new token))

and the median over `--repeats` is reported. The default model is the ~25M-parameter GPT-2
config of the decode target (6 layers, width 512, 8 heads, vocab 8192, 512 positions) with
random weights; `--model DIR` takes a `save_pretrained` directory instead.

    python bench/bench_decode.py --variants int8 fp32 --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# torch's OpenMP threads must not spin between calls either (ORT runs with allow_spinning=0):
# on a shared machine a spinning pool is several times slower. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def build_model(model_dir: str | None):
    from transformers import GPT2Config, GPT2LMHeadModel

    from planc.backends.onnx.decoder import load_hf_decoder

    if model_dir:
        return load_hf_decoder(model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=512, n_embd=512, n_layer=6, n_head=8)
    return GPT2LMHeadModel(config).eval()


def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, prompt_len), generator=gen)


def time_torch(model, ids: torch.Tensor, new_tokens: int) -> float:
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return elapsed


def time_ort(session, ids: torch.Tensor, new_tokens: int) -> float:
    from planc.backends.onnx.generate import generate_ids

    rows = ids.tolist()
    start = time.perf_counter()
    out = generate_ids(session, rows, new_tokens, eos_token_ids=[])
    elapsed = time.perf_counter() - start
    assert all(len(r) == new_tokens for r in out)
    return elapsed


def measure(fn, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one engine, from a 1-token and an N-token run."""
    batch, prompt_len = ids.shape
    t_one = fn(ids, 1)
    t_all = fn(ids, new_tokens)
    return batch * prompt_len / t_one, batch * (new_tokens - 1) / max(t_all - t_one, 1e-9)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="save_pretrained directory (default: 25M GPT-2 config, random weights)")
    parser.add_argument("--variants", nargs="+", default=["int8"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fusions", action="store_true", help="export without onnxscript's ORT fusions")
    parser.add_argument("--providers", nargs="+", default=["cpu"], choices=["auto", "cuda", "cpu"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from planc.backends.onnx.decoder import export_decoder
    from planc.backends.onnx.generate import DecoderSession

    torch.set_num_threads(args.threads)
    model = build_model(args.model)
    vocab = model.get_output_embeddings().out_features
    params = sum(p.numel() for p in model.parameters())
    console = Console()
    results: dict = {"params": params, "threads": args.threads, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for variant in args.variants:
            out = Path(tmp) / variant
            export_decoder(model, out, quantize=None if variant == "fp32" else variant, fusions=not args.no_fusions)
            sessions[variant] = DecoderSession(out, providers=args.providers, threads=args.threads)
        engines = {"transformers": lambda ids, n: time_torch(model, ids, n)}
        for variant, session in sessions.items():
            engines[f"ort-{variant}"] = lambda ids, n, s=session: time_ort(s, ids, n)

        for batch in args.batch:
            ids = prompts_for(batch, args.prompt_len, vocab)
            for fn in engines.values():  # warm-up: first calls allocate and compile
                fn(ids, 2)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
            for _ in range(args.repeats):
                for name, fn in engines.items():
                    samples[name].append(measure(fn, ids, args.new_tokens))
            base_prefill = statistics.median(s[0] for s in samples["transformers"])
            base_decode = statistics.median(s[1] for s in samples["transformers"])
            for name, values in samples.items():
                prefill = statistics.median(v[0] for v in values)
                decode = statistics.median(v[1] for v in values)
                results["rows"].append({
                    "engine": name, "batch": batch, "prefill_tok_s": prefill, "decode_tok_s": decode,
                    "prefill_x": prefill / base_prefill, "decode_x": decode / base_decode,
                })

    table = Table(title=f"decode benchmark: {params / 1e6:.1f}M params, {args.threads} threads, "
                        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    for column in ("engine", "batch", "prefill tok/s", "decode tok/s", "prefill x", "decode x"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for row in results["rows"]:
        table.add_row(row["engine"], str(row["batch"]), f"{row['prefill_tok_s']:.0f}", f"{row['decode_tok_s']:.0f}",
                      f"{row['prefill_x']:.2f}", f"{row['decode_x']:.2f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
