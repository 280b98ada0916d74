"""Speculative against plain greedy decoding of the trained example GPT on ONNX Runtime.

The full model is the trained GPT of examples/gpt_decode_int8.plan twice: exported here as an
fp32 decoder (out/gpt_fp32_target), where speculation is exact, and that plan's int8 decoder
(out/gpt_int8/onnx), where a (k + 1)-token verify call quantizes its activations with another
scale than a one-token call and may flip a close choice (the `equal` column says when it did).
Its drafts are built here from checkpoints, as int8 decoders, into out/:

- `drop`: blocks 0 and 3 of the trained GPT, nothing else (out/gpt_drop_draft);
- `drop1`: block 0 alone (out/gpt_drop1_draft), cheaper still;
- `distilled`: the same blocks distilled from the full model for 150 steps by
  examples/gpt_draft.plan (out/gpt_draft/onnx; skipped when that plan was not compiled).

For each draft, batch 1 and 4: whether the tokens equal plain greedy decoding token for token,
the acceptance rate (the batch's, i.e. the minimum over its rows, and each row's own), tokens per
call of the full model, and tokens/s of both, the median of `--rounds` interleaved runs.

    python bench/bench_speculative.py [--draft-tokens 4] [--new-tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def main(", "import os\n", "class Config:", "    for i in range("]
KEEP = [0, 3]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def build_decoder(checkpoint: Path, out_dir: Path, keep: list[int] | None = KEEP, int8: bool = True) -> Path:
    """Blocks `keep` (None: all) of the 4-layer example GPT in `checkpoint`, exported as a decoder."""
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO / "tests"))
    from shared_models import example_gpt_module

    from planc.backends.onnx.decoder import export_decoder
    from planc.passes.quantize import Quantize

    if (out_dir / "decoder.json").is_file():
        return out_dir
    model = example_gpt_module().gpt(n_layer=4, n_head=4, d_model=128)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    draft = copy.deepcopy(model).eval()
    if keep is not None:
        draft.blocks = nn.ModuleList(draft.blocks[i] for i in keep)
    quantize = Quantize(scheme="int8", mode="dynamic", granularity="per_channel") if int8 else None
    export_decoder(draft, out_dir, quantize=quantize)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from planc.backends.onnx.speculative import measure

    trained = REPO / "out/gpt_int8/train/gpt_stdlib.pt"
    targets = {"fp32": build_decoder(trained, REPO / "out/gpt_fp32_target", keep=None, int8=False),
               "int8": REPO / "out/gpt_int8/onnx"}
    drafts = {"drop": build_decoder(trained, REPO / "out/gpt_drop_draft"),
              "drop1": build_decoder(trained, REPO / "out/gpt_drop1_draft", keep=[0])}
    distilled = REPO / "out/gpt_draft/train/gpt_draft.pt"
    if distilled.is_file():
        drafts["distilled"] = build_decoder(distilled, REPO / "out/gpt_draft/onnx")
    print(f"{cpu_name()}, {args.threads} ORT threads, shared machine (other jobs ran alongside)")
    print(f"{len(PROMPTS)} prompts, {args.new_tokens} new tokens, k = {args.draft_tokens}, "
          f"median of {args.rounds} interleaved runs")
    print(f"{'target':6} {'draft':10} {'batch':>5} {'equal':>6} {'accept':>7} {'row acc':>7} {'tok/call':>8} "
          f"{'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7}")
    results = {}
    for (target, target_dir), (name, directory) in itertools.product(targets.items(), drafts.items()):
        figures = measure(target_dir, directory, PROMPTS, args.new_tokens, args.draft_tokens, batches=(1, 4),
                          threads=args.threads, rounds=args.rounds)
        results[f"{target}/{name}"] = figures
        for batch, f in figures["batches"].items():
            print(f"{target:6} {name:10} {batch:>5} {str(f['greedy_equal']):>6} {f['acceptance_rate']:7.3f} "
                  f"{f['row_acceptance_rate']:7.3f} {f['tokens_per_target_call']:8.2f} {f['plain_tokens_per_s']:11.1f} "
                  f"{f['speculative_tokens_per_s']:10.1f} {f['speedup']:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=2))
    if not all(r["greedy_equal"] for key, r in results.items() if key.startswith("fp32/")):
        sys.exit("speculative decoding did not reproduce the fp32 target's plain greedy decoding")


if __name__ == "__main__":
    main()
