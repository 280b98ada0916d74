"""Prefill and decode tokens/s of a decoder artifact on ONNX Runtime vs transformers' generate.

Both engines run the same weights, greedy, with a key/value cache, on the same prompts, in
one process, with the same thread budget (torch.set_num_threads, ORT intra-op threads without
spinning; OMP_WAIT_POLICY=PASSIVE for torch). Every engine generates 1 and N new tokens, and
all these runs are timed interleaved in a freshly shuffled order every round
(`timing.interleaved_medians`), so that machine noise hits every engine alike. From the median
times t(1) and t(N) over `--rounds`:

    prefill tok/s = batch * prompt_len / t(1)
    decode  tok/s = batch * (N - 1) / (t(N) - t(1))

The default model is the ~25M-parameter GPT-2 config of the decode target (6 layers, width 512,
8 heads, vocab 8192, 512 positions) with random weights; `--model DIR` takes a `save_pretrained`
directory instead. Results: bench/results/decode.md and .json (`--out`, `--json`).

    python bench/bench_decode.py --variants int8 fp32 --batch 1 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# torch's OpenMP threads must not spin between calls either (ORT runs with allow_spinning=0):
# on a shared machine a spinning pool is several times slower. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402


def build_model(model_dir: str | None):
    from transformers import GPT2Config, GPT2LMHeadModel

    from planc.backends.onnx.decoder.exporter import load_hf_decoder

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
    from planc.backends.onnx.decoder.generate import generate_ids

    rows = ids.tolist()
    start = time.perf_counter()
    out = generate_ids(session, rows, new_tokens, eos_token_ids=[])
    elapsed = time.perf_counter() - start
    assert all(len(r) == new_tokens for r in out)
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="save_pretrained directory (default: 25M GPT-2 config, random weights)")
    parser.add_argument("--variants", nargs="+", default=["int8"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fusions", action="store_true", help="export without onnxscript's ORT fusions")
    parser.add_argument("--providers", nargs="+", default=["cpu"], choices=["auto", "cuda", "cpu"])
    results_file.add_output_args(parser, "decode")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode tok/s is t(N) - t(1)")

    from planc.backends.onnx.decoder.exporter import export_decoder
    from planc.backends.onnx.decoder.session import DecoderSession
    from planc.backends.onnx.timing import interleaved_medians

    source = results_file.provenance(__file__, argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.model)
    vocab = model.get_output_embeddings().out_features
    params = sum(p.numel() for p in model.parameters())
    results: dict = {"params": params, "threads": args.threads, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": []}
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
            runs = {(name, n): (lambda fn=fn, n=n: fn(ids, n)) for name, fn in engines.items() for n in (1, args.new_tokens)}
            ms = interleaved_medians(runs, rounds=args.rounds)
            rates = {}
            for name in engines:
                t_one, t_all = ms[(name, 1)] / 1e3, ms[(name, args.new_tokens)] / 1e3
                rates[name] = (batch * args.prompt_len / t_one, batch * (args.new_tokens - 1) / max(t_all - t_one, 1e-9))
            base_prefill, base_decode = rates["transformers"]
            for name, (prefill, decode) in rates.items():
                results["rows"].append({
                    "engine": name, "batch": batch, "prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1),
                    "prefill_x": round(prefill / base_prefill, 3), "decode_x": round(decode / base_decode, 3),
                })

    body = results_file.table(
        ["engine", "batch", "prefill tok/s", "decode tok/s", "prefill x", "decode x"],
        [[r["engine"], r["batch"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.0f}", f"{r['prefill_x']:.2f}",
          f"{r['decode_x']:.2f}"] for r in results["rows"]])
    title = (f"Decoder on ONNX Runtime vs transformers' generate: {params / 1e6:.1f}M params, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens")
    print(body)
    results_file.write(args, title, source, results_file.interleaved_protocol(args.rounds, args.threads), body, results)
    return results


if __name__ == "__main__":
    main()
