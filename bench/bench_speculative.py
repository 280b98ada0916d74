"""Speculative against plain greedy decoding of the trained example GPT on ONNX Runtime.

The full model is the trained GPT of examples/gpt_decode_int8.plan twice: exported here as an
fp32 decoder (WORK/gpt_fp32_target), where speculation is exact, and that plan's int8 decoder
(out/gpt_int8/onnx; skipped when absent), where a (k + 1)-token verify call quantizes its
activations with another scale than a one-token call and may flip a close choice (the `equal`
column says when it did). Its drafts are exported here from checkpoints, as int8 decoders:

- `drop`: blocks 0 and 3 of the trained GPT, nothing else (WORK/gpt_drop_draft);
- `drop1`: block 0 alone (WORK/gpt_drop1_draft), cheaper still;
- `distilled`: the same blocks distilled from the full model for 150 steps by
  examples/gpt_draft.plan (exported to out/gpt_draft/onnx, where examples/gpt_speculative.plan
  reads it; skipped when that plan was not compiled).

For each target and batch size (1 and 4): plain decoding and speculation with every draft are
timed interleaved in a freshly shuffled order every round (`timing.interleaved_medians`, median
of `--rounds`), so each speedup is against the plain baseline of the same rounds. Outside the
timing, one run per draft gives whether its tokens equal plain greedy decoding token for token,
the acceptance rate (the batch's, i.e. the minimum over its rows, and each row's own) and
tokens per call of the full model. Results: bench/results/speculative_gpt.md and .json.

    python bench/bench_speculative.py [--draft-tokens 4] [--new-tokens 64] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import results_file  # noqa: E402

PROMPTS = ["def main(", "import os\n", "class Config:", "    for i in range("]
KEEP = [0, 3]


def build_decoder(checkpoint: Path, out_dir: Path, keep: list[int] | None = KEEP, int8: bool = True) -> Path:
    """Blocks `keep` (None: all) of the 4-layer example GPT in `checkpoint`, exported as a decoder
    (again every run: an export from an older checkpoint or older code must not be timed)."""
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO / "tests"))
    from shared_models import example_gpt_module

    from planc.backends.onnx.decoder.exporter import export_decoder
    from planc.passes.quantize import Quantize

    model = example_gpt_module().gpt(n_layer=4, n_head=4, d_model=128)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    draft = copy.deepcopy(model).eval()
    if keep is not None:
        draft.blocks = nn.ModuleList(draft.blocks[i] for i in keep)
    quantize = Quantize(scheme="int8", mode="dynamic", granularity="per_channel") if int8 else None
    export_decoder(draft, out_dir, quantize=quantize)
    return out_dir


def compare(target_dir: Path, drafts: dict[str, Path], batches: list[int], args: argparse.Namespace) -> list[dict]:
    """One row per batch size and decoding (plain, then each draft) for one target."""
    from planc.backends.onnx.decoder.generate import generate_ids
    from planc.backends.onnx.decoder.session import DecoderSession
    from planc.backends.onnx.decoder.speculative import SpeculativeStats, check_compatible, speculative_generate_ids
    from planc.backends.onnx.timing import interleaved_medians

    target = DecoderSession(target_dir, providers=["cpu"], threads=args.threads)
    proposers = {name: DecoderSession(d, providers=["cpu"], threads=args.threads) for name, d in drafts.items()}
    for proposer in proposers.values():
        check_compatible(target, proposer)
    encoded = target.encode(PROMPTS)
    rows = []
    for size in batches:
        batch = [encoded[i % len(encoded)] for i in range(size)]

        def plain(batch=batch):
            return generate_ids(target, batch, args.new_tokens)

        def speculate(proposer, batch=batch, stats=None):
            return speculative_generate_ids(target, proposer, batch, args.new_tokens, draft_tokens=args.draft_tokens,
                                            stats=stats)

        reference = plain()
        tokens = sum(len(r) for r in reference)
        runs = {"plain": plain, **{name: (lambda p=p: speculate(p)) for name, p in proposers.items()}}
        ms = interleaved_medians(runs, rounds=args.rounds)
        base = tokens / ms["plain"] * 1e3
        rows.append({"batch": size, "draft": "plain", "tokens_per_s": round(base, 1), "speedup": 1.0})
        for name, proposer in proposers.items():
            stats = SpeculativeStats()
            equal = speculate(proposer, stats=stats) == reference
            speed = tokens / ms[name] * 1e3
            rows.append({"batch": size, "draft": name, "greedy_equal": equal, **stats.as_dict(),
                         "tokens_per_s": round(speed, 1), "speedup": round(speed / base, 3)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "out/gpt_int8/train/gpt_stdlib.pt",
                        help="the trained full GPT (default: what examples/gpt_decode_int8.plan trains)")
    parser.add_argument("--int8-target", type=Path, default=REPO / "out/gpt_int8/onnx",
                        help="that plan's int8 decoder (skipped when absent)")
    parser.add_argument("--distilled", type=Path, default=REPO / "out/gpt_draft/train/gpt_draft.pt",
                        help="examples/gpt_draft.plan's distilled draft (skipped when absent)")
    parser.add_argument("--work", type=Path, default=REPO / "out", help="where the fp32 target and the drop drafts are exported")
    results_file.add_output_args(parser, "speculative_gpt")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"{args.checkpoint} does not exist: compile examples/gpt_decode_int8.plan first (it trains the GPT)")

    source = results_file.provenance(__file__, argv)
    targets = {"fp32": build_decoder(args.checkpoint, args.work / "gpt_fp32_target", keep=None, int8=False)}
    if (args.int8_target / "decoder.json").is_file():
        targets["int8"] = args.int8_target
    else:
        print(f"{args.int8_target} has no decoder: skipping the int8 target's rows")
    drafts = {"drop": build_decoder(args.checkpoint, args.work / "gpt_drop_draft"),
              "drop1": build_decoder(args.checkpoint, args.work / "gpt_drop1_draft", keep=[0])}
    if args.distilled.is_file():
        drafts["distilled"] = build_decoder(args.distilled, args.distilled.parents[1] / "onnx")
    else:
        print(f"{args.distilled} does not exist: skipping the distilled draft")

    rows = [{"target": name, **row} for name, directory in targets.items() for row in compare(directory, drafts, args.batch, args)]
    results = {"prompts": PROMPTS, "new_tokens": args.new_tokens, "draft_tokens": args.draft_tokens,
               "threads": args.threads, "rounds": args.rounds, "rows": rows}

    def cell(row: dict, key: str, spec: str) -> str:
        return format(row[key], spec) if key in row else "–"

    body = results_file.table(
        ["target", "draft", "batch", "equal", "accept", "row accept", "tok/call", "tok/s", "x plain"],
        [[r["target"], r["draft"], r["batch"], str(r.get("greedy_equal", "–")), cell(r, "acceptance_rate", ".3f"),
          cell(r, "row_acceptance_rate", ".3f"), cell(r, "tokens_per_target_call", ".2f"), f"{r['tokens_per_s']:.1f}",
          f"{r['speedup']:.2f}"] for r in rows])
    title = (f"Speculative vs plain greedy decoding, trained example GPT: {len(PROMPTS)} prompts, "
             f"{args.new_tokens} new tokens, k = {args.draft_tokens}")
    print(body)
    results_file.write(args, title, source, results_file.interleaved_protocol(args.rounds, args.threads), body, results)
    if not all(r["greedy_equal"] for r in rows if r["target"] == "fp32" and r["draft"] != "plain"):
        sys.exit("speculative decoding did not reproduce the fp32 target's plain greedy decoding")
    return results


if __name__ == "__main__":
    main()
