"""Training data: packed token rows for decoders, tokenized sentences for encoders.

Decoders   load_token_corpus (read_documents, tokenize, pack, split_heldout), BatchStream,
           heldout_batches, causal_lm_loss
Encoders   load_sentence_corpus (sentences from corpus.collect_sentences, augmented and
           tokenized), SentenceSet, SentenceBatches, sentence_heldout_batches, sentence_inputs,
           mean_pool

Both streams are seeded per data-parallel rank and indexed by micro-batch number from the start
of training, so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .corpus import augment_sentence, collect_sentences, vocabulary_words
from .model_source import load_tokenizer, spec_directory


def read_documents(path: str, glob: str, max_bytes: int, base: Path) -> list[bytes]:
    """Local text, in sorted file order, up to `max_bytes`: a file, a folder, or `stdlib`."""
    if path == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob(glob) if "site-packages" not in p.parts and p.is_file())
    else:
        root = Path(path) if Path(path).is_absolute() else base / path
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob(glob) if p.is_file())
        else:
            raise FileNotFoundError(f"training data {root} does not exist")
    documents, total = [], 0
    for file in files:
        if total >= max_bytes:
            break
        data = file.read_bytes()[: max_bytes - total]
        if data:
            documents.append(data)
            total += len(data)
    if not documents:
        raise ValueError(f"no training text found under {root} (glob {glob!r})")
    return documents


def tokenize(documents: list[bytes], tokenizer: str, model_spec: dict[str, Any]) -> torch.Tensor:
    """One long id sequence: raw bytes (0..255), or the Hugging Face model's own tokenizer."""
    if tokenizer == "bytes":
        return torch.tensor(bytearray(b"\n".join(documents)), dtype=torch.long)
    if model_spec["kind"] != "hf":
        raise ValueError("tokenizer = model needs a Hugging Face model directory with tokenizer files")
    tok = _model_tokenizer(model_spec)
    ids: list[int] = []
    for doc in documents:
        ids.extend(tok(doc.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"])
        if tok.sep_token_id is not None or tok.eos_token_id is not None:
            ids.append(tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping rows of seq_len + 1 ids: inputs are row[:-1], next-token targets row[1:]."""
    rows = len(ids) // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one sequence of {seq_len + 1}")
    return ids[: rows * (seq_len + 1)].view(rows, seq_len + 1)


def split_heldout(rows: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout): the last `fraction` of the rows is never trained on."""
    held = math.ceil(len(rows) * fraction) if fraction > 0 else 0
    held = min(held, len(rows) - 1)
    return rows[: len(rows) - held], rows[len(rows) - held :]


def load_token_corpus(
    data: dict[str, Any], model_spec: dict[str, Any], base: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read, tokenize, pack and split the plan's `data` block: (train rows, held-out rows)."""
    documents = read_documents(data["path"], data["glob"], data["max_bytes"], base)
    rows = pack(tokenize(documents, data["tokenizer"], model_spec), data["seq_len"])
    return split_heldout(rows, data["heldout"])


class BatchStream:
    """This data-parallel rank's micro-batches, in a seeded order a resumed run reproduces.

    Micro-batch `index` counts from the start of training, so a run resumed at optimizer step
    s asks for index s * accumulation and sees exactly the data an uninterrupted run would.
    """

    def __init__(self, rows: torch.Tensor, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        from torch.utils.data import DistributedSampler

        self.rows, self.micro_batch = rows, micro_batch
        self.sampler = DistributedSampler(
            rows, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_epoch = len(self.sampler) // micro_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(rows)} training sequences cannot fill one micro-batch of {micro_batch} on each "
                f"of {dp_size} data-parallel ranks: raise data.max_bytes or lower micro_batch"
            )
        self._epoch, self._order = -1, []

    def batch(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        picked = self._order[position * self.micro_batch : (position + 1) * self.micro_batch]
        return self.rows[picked]


def heldout_batches(
    rows: torch.Tensor, micro_batch: int, dp_rank: int, dp_size: int, limit: int, multiple: int = 1
) -> list[torch.Tensor]:
    """This rank's share of the first `limit` held-out sequences, in batches of up to `micro_batch`.

    The evaluated set does not depend on the parallel layout (only rounded down to a multiple of
    dp_size x `multiple`, the pipeline's chunk count), so eval losses compare across layouts.
    """
    count = min(limit, len(rows))
    count -= count % (dp_size * multiple)
    per_rank = count // dp_size
    shard = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [shard[i : i + micro_batch] for i in range(0, per_rank, micro_batch)]


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class SentenceSet:
    """Tokenized sentences: one sample each, with the pad id to batch them."""

    texts: list[str]
    ids: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def mean_tokens(self) -> float:
        return sum(map(len, self.ids)) / max(1, len(self.ids))

    def fingerprint(self) -> str:
        """A digest of the token ids: equal sets have equal fingerprints on every machine."""
        import hashlib

        digest = hashlib.sha256()
        for row in self.ids:
            digest.update(torch.tensor(row, dtype=torch.int32).numpy().tobytes() + b"|")
        return digest.hexdigest()[:16]

    def subset(self, indices: Sequence[int]) -> SentenceSet:
        return SentenceSet([self.texts[i] for i in indices], [self.ids[i] for i in indices], self.pad_id)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Samples `indices` padded to the longest of them: input_ids, attention_mask, index."""
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[j, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor(list(indices), dtype=torch.long)}


def _model_tokenizer(model_spec: dict[str, Any]) -> Any:
    directory = spec_directory(model_spec)
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise ValueError(f"{directory} has no tokenizer files: use data {{ tokenizer = bytes }}")
    return tokenizer


def load_sentence_corpus(data: dict[str, Any], model_spec: dict[str, Any], base: Path) -> tuple[SentenceSet, SentenceSet]:
    """(train, heldout) sentences of the plan's `data` block, tokenized with the model's tokenizer.

    The order is a seeded shuffle of the collected sentences, so the held-out tail (`heldout`)
    mixes every source; only training sentences get augmented copies.
    """
    if model_spec["kind"] != "hf":
        raise ValueError("sentence data needs a Hugging Face model's tokenizer (data.tokenizer = model)")
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            collect_sentences(data, base)  # reads the machine's text once and caches it for every rank
        dist.barrier()
    texts = collect_sentences(data, base)
    random.Random(0).shuffle(texts)
    held = min(len(texts) - 1, math.ceil(len(texts) * data["heldout"])) if data["heldout"] > 0 else 0
    train_texts, heldout_texts = texts[: len(texts) - held], texts[len(texts) - held :]
    tokenizer = _model_tokenizer(model_spec)
    rng, originals = random.Random(1), list(train_texts)
    vocabulary = vocabulary_words(tokenizer) if "word_swap" in data.get("augment", []) else []
    for kind in data.get("augment", []):
        chosen = [t for t in originals if rng.random() < data.get("augment_fraction", 0.5)]
        train_texts += [augment_sentence(t, kind, rng, vocabulary) for t in chosen]

    def encode(batch: list[str]) -> SentenceSet:
        ids = tokenizer(batch, truncation=True, max_length=data["seq_len"])["input_ids"] if batch else []
        return SentenceSet(batch, [list(map(int, row)) for row in ids], int(tokenizer.pad_token_id))

    return encode(train_texts), encode(heldout_texts)


class SentenceBatches:
    """This data-parallel rank's micro-batches of sentences, seeded and resumable like BatchStream.

    Each rank owns a fixed shard (every dp_size-th sample), so cached teacher outputs stay on
    the rank that computed them. Each epoch shuffles the shard, sorts windows of 50 batches by
    length (little padding) and shuffles the batches again.
    """

    def __init__(self, samples: SentenceSet, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        per_rank = len(samples) // dp_size
        self.samples, self.micro_batch, self.seed = samples, micro_batch, seed
        self.shard = list(range(dp_rank, per_rank * dp_size, dp_size))
        self.per_epoch = per_rank // micro_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(samples)} training sentences cannot fill one micro-batch of {micro_batch} on each of "
                f"{dp_size} data-parallel ranks: add text (data.path, data.corpora) or lower micro_batch"
            )
        self._epoch, self._batches = -1, []

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(self.shard)
        rng.shuffle(order)
        order = order[: self.per_epoch * self.micro_batch]
        window = 50 * self.micro_batch
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(self.samples.ids[i]))
            batches += [chunk[i : i + self.micro_batch] for i in range(0, len(chunk), self.micro_batch)]
        rng.shuffle(batches)
        return batches

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan_epoch(epoch)
        return self.samples.collate(self._batches[position])


def sentence_heldout_batches(samples: SentenceSet, micro_batch: int, dp_rank: int, dp_size: int,
                             limit: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the first `limit` held-out sentences, in length-sorted batches."""
    count = min(limit, len(samples))
    count -= count % dp_size
    mine = sorted(range(dp_rank, count, dp_size), key=lambda i: len(samples.ids[i]))
    return [samples.collate(mine[i : i + micro_batch]) for i in range(0, len(mine), micro_batch)]


def sentence_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's keyword inputs of a sentence batch, on `device`."""
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states averaged over real tokens (attention_mask 1) [batch, hidden], fp32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
