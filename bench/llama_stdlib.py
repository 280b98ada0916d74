"""The decoder benchmarks' Llama-config model, trained briefly on the standard library's sources.

Issue 14's comparison model: 8 layers, width 512, 8 query / 4 key-value heads (grouped-query
attention), RoPE, RMSNorm, SwiGLU (intermediate 1536), byte vocabulary (padded to 288, see
`Recipe.vocab`), 25.5M parameters. A random model's next-token distribution is nearly uniform,
and quantization error hardly moves its top-1; 150 AdamW steps on real code make the
predictions peaked the way a real model's are, so top-1 and perplexity deltas mean something.

The text is what planc's training target reads for `data { path = stdlib }`
(`planc_runtime.data.read_documents`, sorted file order, raw bytes) packed in rows of 129
bytes; the last 2% of the rows are never trained on and serve as held-out text. The trained
model is a `save_pretrained` directory cached under `out/` by its settings, so the benchmarks
train it once.

    python bench/llama_stdlib.py            # train (or find) it, print where it is
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# OpenMP threads must not spin on a shared machine; set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (the cache key)."""

    layers: int = 8
    width: int = 512
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1536
    positions: int = 512
    #: 256 bytes + 32 ids never used: ONNX Runtime GenAI's builder takes any Linear whose width
    #: equals the vocabulary for the LM head (`has_lm_head`), and the 4 x 64 key/value
    #: projections are 256 wide; at vocabulary 256 its graph reads logits from layer 0.
    vocab: int = 288
    steps: int = 150
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 15
    corpus_bytes: int = 4 << 20
    heldout_fraction: float = 0.02
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def config(recipe: Recipe):
    from transformers import LlamaConfig

    # Byte 0 (NUL, absent from source text) stands for end-of-sequence and padding: ONNX Runtime
    # GenAI's builder requires an eos id; the benchmarks generate their full length regardless.
    return LlamaConfig(vocab_size=recipe.vocab, hidden_size=recipe.width, intermediate_size=recipe.intermediate,
                       num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                       num_key_value_heads=recipe.kv_heads, max_position_embeddings=recipe.positions,
                       bos_token_id=None, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)


def _gpt2_byte_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what `tokenizers`' ByteLevel works in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_byte_tokenizer(directory: Path) -> None:
    """A `tokenizer.json` whose ids are the UTF-8 bytes (BPE without merges over GPT-2's byte
    alphabet): the builder and `og.Tokenizer` need a tokenizer file, planc reads it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _gpt2_byte_table().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))


def corpus_rows(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows) [n, seq_len + 1] of standard-library bytes."""
    from planc.backends.train.planc_runtime.data import pack, read_documents, split_heldout, tokenize

    documents = read_documents("stdlib", "*.py", recipe.corpus_bytes, REPO)
    rows = pack(tokenize(documents, "bytes", {"kind": "bytes"}), recipe.seq_len)
    return split_heldout(rows, recipe.heldout_fraction)


def train(recipe: Recipe, out: Path) -> Path:
    """AdamW with linear warm-up and cosine decay; writes `out` (save_pretrained) and returns it."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config(recipe))
    train_rows, _ = corpus_rows(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    started = time.perf_counter()
    for step in range(recipe.steps):
        picked = torch.randint(0, len(train_rows), (recipe.batch,), generator=gen)
        rows = train_rows[picked]
        logits = model(input_ids=rows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == recipe.steps - 1:
            logger.info("step %d/%d loss %.3f (%.0f s)", step + 1, recipe.steps, loss.item(), time.perf_counter() - started)
    tmp = out.with_name(out.name + ".tmp")
    model.eval().save_pretrained(tmp)
    write_byte_tokenizer(tmp)
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    tmp.rename(out)
    return out


def trained_model_dir(recipe: Recipe = Recipe(), cache: Path = REPO / "out" / "bench_models") -> Path:
    """The `save_pretrained` directory of `recipe`'s model, trained on first use."""
    out = cache / f"llama_stdlib_{recipe.key()}"
    if (out / "config.json").exists():
        if not (out / "tokenizer.json").exists():
            write_byte_tokenizer(out)
        return out
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("training the benchmark model (%d steps, cached as %s)", recipe.steps, out)
    return train(recipe, out)


def heldout_windows(recipe: Recipe = Recipe(), count: int = 32) -> torch.Tensor:
    """The first `count` held-out rows [count, seq_len + 1]: never trained on."""
    return corpus_rows(recipe)[1][:count]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    print(trained_model_dir())
