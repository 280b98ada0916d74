"""planc_runtime: the helpers a planc-generated `train.py` imports.

planc copies this file verbatim next to the `train.py` it generates. It needs torch alone
(transformers only for Hugging Face models, tqdm only for the progress bar). `train.py` says
*what* runs, top to bottom, with the plan's values as constants; this module says *how*:

1. distributed setup      init_distributed, seed_everything
2. the model              load_model, find_blocks
3. data                   load_token_corpus, BatchStream, heldout_batches
4. compression            shrink_attention_heads, shrink_mlp_channels, LowRankLinear,
                          PruneMasks, FakeQuantLinear, dense_state_dict
5. distillation           Distiller
6. step mechanics         checkpoint_blocks, make_optimizer, lr_multiplier, make_grad_scaler,
                          clip_grad_norm
7. parallelism            wrap_ddp, all_reduce_grads, shard_fsdp, parallelize_tensor,
                          split_blocks, DecoderStage
8. checkpoints            Checkpointer, full_state_dict, save_atomically
9. logging and faults     MetricsLog, ProgressBar, StepTimer, maybe_fail, mean_over,
                          global_mean, loss_weight
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("planc.train")


# ============================================================================ 1. distributed setup


@dataclass
class Parallel:
    """Where this process sits: its device and its coordinates in the (pp, dp, tp) mesh."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh with dims ("pp", "dp", "tp")

    @property
    def pp_size(self) -> int:
        return self.mesh["pp"].size()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size()

    @property
    def tp_size(self) -> int:
        return self.mesh["tp"].size()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics and saves the trained weights."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(pipeline_stages: int = 1, tensor_parallel: int = 1) -> Parallel:
    """Join the torchrun job (or form a one-process job when run as plain `python train.py`).

    nccl when CUDA is visible, gloo otherwise. The data-parallel size is what remains of the
    world after the pipeline and tensor-parallel dimensions, so the same program runs from one
    process to many nodes.
    """
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        # torchrun keeps one store across restarts: give every attempt its own key space, so a
        # restarted worker never reads the addresses its dead predecessors published.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"planc/attempt_{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
    world = dist.get_world_size()
    if world % (pipeline_stages * tensor_parallel):
        raise RuntimeError(
            f"{world} processes cannot hold {pipeline_stages} pipeline stages x "
            f"{tensor_parallel} tensor-parallel ranks: the world size must be a multiple of "
            f"{pipeline_stages * tensor_parallel}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // (pipeline_stages * tensor_parallel)
    mesh = init_device_mesh(
        device.type, (pipeline_stages, dp, tensor_parallel), mesh_dim_names=("pp", "dp", "tp")
    )
    return Parallel(dist.get_rank(), world, local_rank, device, backend, mesh)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: every rank builds identical initial weights."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere; silence known-harmless library warnings."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # FSDP warns about the key/value views our blocks return next to the hidden state.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.*")


# ============================================================================ 2. the model


def load_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the plan's model: a factory function (file or module) or a Hugging Face directory."""
    if spec["kind"] == "factory":
        module = None
        if spec.get("module"):
            try:
                module = importlib.import_module(spec["module"])
            except ModuleNotFoundError:
                if not spec.get("file"):
                    raise
        if module is None:
            module = _import_file(Path(spec["file"]))
        factory = getattr(module, spec["function"], None)
        if factory is None:
            raise AttributeError(f"{spec['function']!r} not found in model factory {module.__name__}")
        return factory(**spec.get("args", {}))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    directory = hf_directory(spec)
    auto = transformers.AutoModelForCausalLM if spec.get("task") == "causal_lm" else transformers.AutoModel
    return auto.from_pretrained(directory, **spec.get("args", {}))


def _import_file(path: Path) -> Any:
    """Import a Python file by path (the model factory named in the plan)."""
    if not path.is_file():
        raise FileNotFoundError(f"model factory file {path} does not exist")
    name = f"planc_model_{path.stem}"
    if name not in sys.modules:
        loader = importlib.util.spec_from_file_location(name, path)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        loader.loader.exec_module(module)
    return sys.modules[name]


def hf_directory(spec: dict[str, Any]) -> Path:
    """The model's local directory, found inside its Python package when one is named.

    A package may keep its model in a subfolder: the shallowest folder holding a config.json
    (at or below the named directory) is the model's.
    """
    if spec.get("package"):
        found = importlib.util.find_spec(spec["package"])
        if found is None or found.origin is None:
            raise ModuleNotFoundError(f"model package {spec['package']!r} is not installed")
        root = Path(found.origin).parent / spec["ref"]
    else:
        root = Path(spec["ref"])
    if (root / "config.json").is_file() or not root.is_dir():
        return root
    configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    return configs[0].parent if configs else root


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of repeated transformer blocks (the longest ModuleList)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks (nn.ModuleList) to train per block")
    return best


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a plain model (a tensor) or a Hugging Face output (`.logits`)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def sentence_embedding(output: Any) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden state of an encoder (no padding in packed data)."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return F.normalize(hidden.float().mean(dim=1), dim=-1)


# ============================================================================ 3. data


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_directory(model_spec))
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


# ============================================================================ 3b. sentences (encoders)
#
# An encoder is distilled on sentences, not packed token streams: every sample is one sentence
# of everyday-length prose, padded per batch. The text comes from the plan's own files and from
# prose already on the machine; nothing is downloaded.

#: Sentence boundaries: end punctuation, space, then a capital letter or a quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
#: Fragments that are code, markup, paths or addresses rather than prose.
_NOT_PROSE = re.compile(r"[{}\[\]<>=_`|\\#@*$~^]|\(\)|>>>|::|\.\.\.|\w\.\w|https?:|www\.|--|\d{4,}")
#: Files under /usr/share/doc worth reading (the rest is binary, HTML or code).
_DOC_NAMES = re.compile(r"(readme|news|changelog|changes|copyright|faq|authors|thanks|todo|history|usage)"
                        r"|\.(txt|md|rst)(\.gz)?$", re.IGNORECASE)


def prose_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """The prose sentences of a text: split at sentence ends inside paragraphs, keeping only
    sentences of `min_words`..`max_words` words that start with a capital, end with . ! or ?,
    are ASCII and look like language (mostly alphabetic words, no code or markup)."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if not (min_words <= len(words) <= max_words):
                continue
            if not sentence[0].isupper() or sentence[-1] not in ".!?" or not sentence.isascii():
                continue
            if _NOT_PROSE.search(sentence):
                continue
            alphabetic = sum(1 for w in words if w.strip(".,;:!?\"'()").isalpha())
            if alphabetic < 0.8 * len(words) or sum(1 for w in words if w.isupper() and len(w) > 1) > 0.3 * len(words):
                continue
            found.append(sentence)
    return found


def _read_text(path: Path, limit: int) -> str:
    """A text file's contents (gzip-compressed ones too), at most `limit` bytes, '' if unreadable."""
    import gzip

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read(limit)
        else:
            with path.open("rb") as handle:
                data = handle.read(limit)
    except (OSError, EOFError):
        return ""
    if b"\0" in data[:1024]:
        return ""  # binary
    return data.decode("utf-8", errors="ignore")


def _stdlib_docstrings() -> Iterator[str]:
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skipped.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield doc


def _pydoc_topics() -> Iterator[str]:
    import pydoc_data.topics

    for topic in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[topic]


def _system_docs(root: Path = Path("/usr/share/doc")) -> Iterator[str]:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and _DOC_NAMES.search(path.name):
            text = _read_text(path, 2_000_000)
            if text:
                yield text


def _everyday() -> Iterator[str]:
    if __package__:  # imported from the planc package
        from . import everyday_text
    else:  # next to a generated train.py
        import everyday_text
    yield from everyday_text.sentences()


#: Offline prose the `corpora` option names.
CORPORA: dict[str, Callable[[], Iterator[str]]] = {
    "docstrings": _stdlib_docstrings,
    "pydoc_topics": _pydoc_topics,
    "system_docs": _system_docs,
    "everyday": _everyday,
}


def _normalized(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def planc_cache_dir() -> Path:
    """planc's cache folder: $PLANC_CACHE, else $XDG_CACHE_HOME/planc, else ~/.cache/planc."""
    root = os.environ.get("PLANC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "planc"
    return Path(root)


def _sources_stamp(data: dict[str, Any], base: Path) -> str:
    """What the collected sentences depend on: options, Python, and the files' names/sizes/times."""
    import hashlib

    digest = hashlib.sha256(json.dumps({k: data.get(k) for k in (
        "path", "glob", "corpora", "exclude", "min_words", "max_words", "max_bytes")}, sort_keys=True).encode())
    digest.update(sys.version.encode())
    roots = [Path(n) if Path(n).is_absolute() else base / n for n in data.get("exclude", [])]
    if data["path"] != "stdlib":
        roots.append(Path(data["path"]) if Path(data["path"]).is_absolute() else base / data["path"])
    if "system_docs" in data.get("corpora", []):
        roots.append(Path("/usr/share/doc"))
    if "everyday" in data.get("corpora", []):
        digest.update(Path(__file__).with_name("everyday_text.py").read_bytes())  # the grammar itself
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []:
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:20]


def collect_sentences(data: dict[str, Any], base: Path, cache: bool = True) -> list[str]:
    """Distinct training sentences of the plan's `data` block, in a stable order.

    The plan's own text (`path`: a file, a folder of `glob` files, or `stdlib` for the standard
    library's docstrings) is kept whole; sentences of `corpora` are mixed in by a seeded
    shuffle until `max_bytes` are collected. Every sentence of an `exclude` file is left out.
    Reading the machine's documentation takes a minute, so the result is cached (by the
    options and the names, sizes and times of the files read) under planc_cache_dir().
    """
    path = planc_cache_dir() / "corpus" / f"{_sources_stamp(data, base)}.json"
    if cache and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    sentences = _collect_sentences(data, base)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(sentences), encoding="utf-8")
        os.replace(tmp, path)
    return sentences


def _collect_sentences(data: dict[str, Any], base: Path) -> list[str]:
    low, high = data.get("min_words", 5), data.get("max_words", 60)
    excluded = set()
    for name in data.get("exclude", []):
        path = Path(name) if Path(name).is_absolute() else base / name
        if not path.is_file():
            raise FileNotFoundError(f"data.exclude names {path}, which does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            excluded.add(_normalized(line))
            excluded.update(_normalized(s) for s in prose_sentences(line, 1, 10_000))
    seen: set[str] = set()

    def take(texts: Iterator[str], budget: int) -> list[str]:
        found = []
        for text in texts:
            for sentence in prose_sentences(text, low, high):
                key = _normalized(sentence)
                if key not in seen and key not in excluded:
                    seen.add(key)
                    found.append(sentence)
                    budget -= len(sentence) + 1
            if budget <= 0:
                break
        return found

    if data["path"] == "stdlib":
        own = take(_stdlib_docstrings(), data["max_bytes"])
    else:
        root = Path(data["path"]) if Path(data["path"]).is_absolute() else base / data["path"]
        files = [root] if root.is_file() else sorted(p for p in root.rglob(data.get("glob", "*.txt")) if p.is_file())
        if not files:
            raise FileNotFoundError(f"training data {root} does not exist or holds no {data.get('glob')} files")
        # One sentence per line is the usual layout of a sentence file: lines are paragraphs.
        own = take(("\n\n".join(_read_text(f, data["max_bytes"]).splitlines()) for f in files), data["max_bytes"])
    extra: list[str] = []
    for name in data.get("corpora", []):
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
        extra += take(CORPORA[name](), 1 << 62)  # all of it: the shuffle below mixes every file in
    random.Random(0).shuffle(extra)
    budget = data["max_bytes"] - sum(len(s) + 1 for s in own)
    for i, sentence in enumerate(extra):
        budget -= len(sentence) + 1
        if budget < 0:
            extra = extra[:i]
            break
    sentences = own + extra
    if not sentences:
        raise ValueError(f"no sentences of {low}-{high} words in the training data ({data['path']}, {data.get('corpora')})")
    return sentences


def augment_sentence(sentence: str, kind: str, rng: random.Random, vocabulary: Sequence[str] = ()) -> str:
    """An altered copy of `sentence`.

    `word_dropout` drops ~10% of its words (keeping at least four); `span_shuffle` swaps two
    adjacent spans of words; `word_swap` replaces ~20% of its words by random whole words of the
    model's vocabulary, so the student meets words the corpus lacks, in context.
    """
    words = sentence.split()
    if kind == "word_dropout":
        drop = max(1, round(0.1 * len(words)))
        if len(words) - drop < 4:
            return sentence
        gone = set(rng.sample(range(len(words)), drop))
        return " ".join(w for i, w in enumerate(words) if i not in gone)
    if kind == "span_shuffle":
        if len(words) < 4:
            return sentence
        cut = rng.randrange(1, len(words) - 1)
        start = rng.randrange(0, cut)
        end = rng.randrange(cut + 1, len(words) + 1)
        return " ".join(words[:start] + words[cut:end] + words[start:cut] + words[end:])
    if kind == "word_swap":
        if not vocabulary:
            raise ValueError("word_swap needs the model's vocabulary")
        common = vocabulary[:WORD_SWAP_VOCABULARY]
        out = []
        for word in words:
            core = word.strip(".,;:!?\"'()")
            if core.isalpha() and rng.random() < WORD_SWAP_RATE:
                new = rng.choice(common)
                out.append(word.replace(core, new.capitalize() if core[0].isupper() else new, 1))
            else:
                out.append(word)
        return " ".join(out)
    raise ValueError(f"unknown augmentation {kind!r}: word_dropout, span_shuffle or word_swap")


#: word_swap: the share of words replaced, and how many of the vocabulary's first (for WordPiece
#: vocabularies: most frequent) whole words replacements are drawn from.
WORD_SWAP_RATE = 0.2
WORD_SWAP_VOCABULARY = 8000


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Whole lowercase words of at least three letters of a WordPiece/BPE vocabulary, in id
    order (BERT's vocabulary lists words by frequency, so the first ones are the common ones)."""
    ordered = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [w.lstrip("\u0120") for w, _ in ordered]
    return list(dict.fromkeys(w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower()))


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


def load_sentence_corpus(data: dict[str, Any], model_spec: dict[str, Any], base: Path) -> tuple[SentenceSet, SentenceSet]:
    """(train, heldout) sentences of the plan's `data` block, tokenized with the model's tokenizer.

    The order is a seeded shuffle of the collected sentences, so the held-out tail (`heldout`)
    mixes every source; only training sentences get augmented copies.
    """
    if model_spec["kind"] != "hf":
        raise ValueError("sentence data needs a Hugging Face model's tokenizer (data.tokenizer = model)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            collect_sentences(data, base)  # reads the machine's text once and caches it for every rank
        dist.barrier()
    texts = collect_sentences(data, base)
    random.Random(0).shuffle(texts)
    held = min(len(texts) - 1, math.ceil(len(texts) * data["heldout"])) if data["heldout"] > 0 else 0
    train_texts, heldout_texts = texts[: len(texts) - held], texts[len(texts) - held :]
    tokenizer = AutoTokenizer.from_pretrained(hf_directory(model_spec))
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


# ============================================================================ 4. compression


def _module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(_module(model, parent), child, new)


def _has(module: nn.Module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
    except AttributeError:
        return False
    return True


def _owners(model: nn.Module, paths: Sequence[str], children: tuple[str, ...]) -> list[str]:
    """Paths of the modules that own all of `children` (dotted paths below them), found from the
    paths a selector matched (anything at or above one of the children: the child, a module
    between it and the owner, the owner, an ancestor), in model order."""
    owners = []
    for name, module in model.named_modules():
        if all(_has(module, c) for c in children):
            own = [f"{name}.{c}" if name else c for c in children]
            if any(_within(c, p) for c in own for p in paths):
                owners.append(name)
    return owners


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _importance(parts: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Per-group importance: l1 or l2 norm over all weights of each group (rows of `parts`)."""
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1).float()
    return flat.abs().sum(1) if norm == "l1" else flat.pow(2).sum(1).sqrt()


def _keep_count(total: int, sparsity: float) -> int:
    return max(1, total - int(round(sparsity * total)))


@dataclass
class Shrink:
    """Record of structural edits, so the saved weights can be laid out at the original size."""

    #: Linear weight path -> (dim shrunk, original size, kept indices).
    cuts: dict[str, tuple[int, int, list[int]]] = field(default_factory=dict)
    #: Block list path -> original indices of the blocks kept, in order.
    blocks: dict[str, list[int]] = field(default_factory=dict)
    #: Weights of removed blocks (original values, CPU): saved back in their place.
    removed: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def _slice_linear(linear: nn.Linear, dim: int, keep: torch.Tensor) -> nn.Linear:
    """A smaller copy of `linear` keeping output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.index_select(dim, keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(weight)
    if linear.bias is not None:
        new.bias.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, keep))
    return new


@torch.no_grad()
def input_gram(model: nn.Module, linear: nn.Linear, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """G = sum over real tokens of [x, 1]^T [x, 1], x the input of `linear` as `model` runs on
    `batches` (eval mode, no dropout): float64, [in + 1, in + 1], last row/column the constant.

    It is all a least-squares refit of `linear`'s input columns needs (refit_columns), and its
    diagonal with the weights gives each input's output energy (output_energy).
    """
    if not batches:
        raise ValueError("importance = activation and reconstruct need calibration batches of training text")
    device = linear.weight.device
    gram = torch.zeros(linear.in_features + 1, linear.in_features + 1, dtype=torch.float64, device=device)
    real: list[torch.Tensor] = []

    def accumulate(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        x = x[real[0]] if x.dim() == 3 else x
        x = torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], 1)
        gram.add_(x.t() @ x)

    handle = linear.register_forward_pre_hook(accumulate)
    training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            if "attention_mask" in batch:  # sentences: skip the padding
                mask = batch["attention_mask"].to(device)
                real[:] = [mask.bool()]
                model(input_ids=ids, attention_mask=mask)
            else:  # packed token rows: every token is real
                real[:] = [torch.ones_like(ids, dtype=torch.bool)]
                model(ids)
    finally:
        handle.remove()
        model.train(training)
    return gram


def output_energy(weight: torch.Tensor, gram: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per group of input columns (rows of `groups`: a head's, or one channel), the summed
    squared norm of what those inputs add to the output, sum_tokens |W[:, g] x_g|^2."""
    w = weight.detach().double().t()  # [in, out]
    return torch.stack([((gram[g][:, g] @ w[g]) * w[g]).sum() for g in groups]).float()


@torch.no_grad()
def refit_columns(linear: nn.Linear, gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-3) -> nn.Linear:
    """A Linear reading only input columns `keep`, refit by (ridge) least squares so that on the
    tokens behind `gram` it reproduces the original's output: the kept columns and the bias
    absorb what the removed ones contributed (e.g. their mean)."""
    device, dtype, bias = linear.weight.device, linear.weight.dtype, linear.bias is not None
    constant = gram.shape[0] - 1
    full = linear.weight.double()
    if bias:
        full = torch.cat([full, linear.bias.double()[:, None]], 1)  # [out, in + 1]
    index = keep.to(device)
    if bias:
        index = torch.cat([index, torch.tensor([constant], device=device)])
    kept = gram[index][:, index]
    damping = ridge * kept.diagonal().mean() * torch.eye(len(index), dtype=torch.float64, device=device)
    solution = torch.linalg.solve(kept + damping, gram[index][:, : full.shape[1]] @ full.t())  # [kept (+1), out]
    new = nn.Linear(len(keep), linear.out_features, bias=bias).to(device=device, dtype=dtype)
    new.weight.copy_(solution[: len(keep)].t())
    if bias:
        new.bias.copy_(solution[-1])
    return new


def calibration_batches(samples: SentenceSet | torch.Tensor, count: int = 1024,
                        micro_batch: int = 32) -> list[dict[str, torch.Tensor]]:
    """The first `count` training sentences (or packed token rows), the same on every rank, in
    batches: the text that importance = activation and reconstruct measure."""
    if isinstance(samples, torch.Tensor):
        rows = samples[: max(1, count // 8)]  # rows hold many sentences' worth of tokens
        return [{"input_ids": rows[i : i + micro_batch]} for i in range(0, len(rows), micro_batch)]
    chosen = sorted(range(min(count, len(samples))), key=lambda i: len(samples.ids[i]))
    return [samples.collate(chosen[i : i + micro_batch]) for i in range(0, len(chosen), micro_batch)]


#: (q, k, v, out) projections of an attention module: the example GPT's and Hugging Face BERT's.
ATTENTION_LAYOUTS = (
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("self.query", "self.key", "self.value", "output.dense"),
)
#: (up-projection, down-projection) of an MLP: the example GPT's and a BERT layer's.
MLP_LAYOUTS = (("fc_in", "fc_out"), ("intermediate.dense", "output.dense"))
#: Attributes naming the head size on attention modules.
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")


def _head_dim(attn: nn.Module, name: str) -> int:
    for module in attn.modules():
        for attr in HEAD_DIM_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError(f"{name} has no head_dim / attention_head_size attribute: cannot tell its heads apart")


def shrink_attention_heads(
    model: nn.Module, paths: Sequence[str], record: Shrink, sparsity: float, importance: str = "l2",
    reconstruct: bool = False, calibration: Sequence[dict[str, torch.Tensor]] = (),
) -> int:
    """Remove the least important `sparsity` fraction of heads of each selected attention.

    An attention is selected by its own path, an ancestor, or any of its q/k/v/out projections
    (GPT layout q_proj/k_proj/v_proj/out_proj, or BERT's self.query/key/value + output.dense).
    Head h owns rows h*d..(h+1)*d of q/k/v and the same columns of the out projection;
    importance is the l1/l2 norm of all of them, or (`activation`) the energy of the head's
    output on the `calibration` batches; `reconstruct` refits the out projection to the kept
    heads (see refit_columns). Both forwards infer the head count from the shapes, so slicing
    the projections is enough. Returns how many heads were removed.
    """
    removed, found = 0, False
    for layout in ATTENTION_LAYOUTS:
        for name in _owners(model, paths, layout):
            found = True
            removed += _shrink_heads(model, name, layout, record, sparsity, importance, reconstruct, calibration)
    if not found:
        raise ValueError(
            "prune method=heads found no attention (q_proj/k_proj/v_proj/out_proj or BERT self.query/key/value + "
            f"output.dense) among the selected modules {list(paths)[:4]}"
        )
    return removed


def _shrink_heads(model: nn.Module, name: str, layout: tuple[str, ...], record: Shrink, sparsity: float,
                  importance: str, reconstruct: bool, calibration: Sequence[dict[str, torch.Tensor]]) -> int:
    attn = _module(model, name)
    head_dim = _head_dim(attn, name)
    q, k, v, out = (attn.get_submodule(p) for p in layout)
    heads = q.out_features // head_dim
    gram = input_gram(model, out, calibration) if importance == "activation" or reconstruct else None
    if importance == "activation":
        scores = output_energy(out.weight, gram, torch.arange(heads * head_dim).view(heads, head_dim))
    else:
        parts = [lin.weight.view(heads, head_dim, -1) for lin in (q, k, v)]
        parts.append(out.weight.view(out.out_features, heads, head_dim).transpose(0, 1))
        scores = _importance(parts, importance)
    kept_heads = scores.topk(_keep_count(heads, sparsity)).indices.sort().values.cpu()
    rows = (kept_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    prefix = f"{name}." if name else ""
    for proj in layout[:3]:
        record.cuts[prefix + proj] = (0, heads * head_dim, rows.tolist())
        _replace(attn, proj, _slice_linear(attn.get_submodule(proj), 0, rows.to(q.weight.device)))
    record.cuts[prefix + layout[3]] = (1, heads * head_dim, rows.tolist())
    if reconstruct:
        _replace(attn, layout[3], refit_columns(out, gram, rows))
    else:
        _replace(attn, layout[3], _slice_linear(out, 1, rows.to(out.weight.device)))
    for module in attn.modules():  # keep BERT's bookkeeping attributes truthful
        if hasattr(module, "num_attention_heads") and hasattr(module, "all_head_size"):
            module.num_attention_heads, module.all_head_size = len(kept_heads), len(kept_heads) * head_dim
    return heads - len(kept_heads)


def shrink_mlp_channels(
    model: nn.Module, paths: Sequence[str], record: Shrink, sparsity: float, importance: str = "l2",
    reconstruct: bool = False, calibration: Sequence[dict[str, torch.Tensor]] = (),
) -> int:
    """Remove the least important `sparsity` fraction of hidden channels of each selected MLP.

    Channel c is row c of the up-projection (fc_in, or BERT's intermediate.dense) with its bias
    and column c of the down-projection (fc_out, or BERT's output.dense). Importance and
    `reconstruct` work as in shrink_attention_heads. Returns channels removed.
    """
    removed, found = 0, False
    for up_name, down_name in MLP_LAYOUTS:
        for name in _owners(model, paths, (up_name, down_name)):
            found = True
            mlp = _module(model, name)
            up, down = mlp.get_submodule(up_name), mlp.get_submodule(down_name)
            width = up.out_features
            gram = input_gram(model, down, calibration) if importance == "activation" or reconstruct else None
            if importance == "activation":
                scores = output_energy(down.weight, gram, torch.arange(width).view(width, 1))
            else:
                scores = _importance([up.weight, down.weight.t()], importance)
            keep = scores.topk(_keep_count(width, sparsity)).indices.sort().values.cpu()
            prefix = f"{name}." if name else ""
            record.cuts[prefix + up_name] = (0, width, keep.tolist())
            record.cuts[prefix + down_name] = (1, width, keep.tolist())
            _replace(mlp, up_name, _slice_linear(up, 0, keep.to(up.weight.device)))
            if reconstruct:
                _replace(mlp, down_name, refit_columns(down, gram, keep))
            else:
                _replace(mlp, down_name, _slice_linear(down, 1, keep.to(down.weight.device)))
            removed += width - len(keep)
    if not found:
        raise ValueError(
            "prune method=channels found no MLP (fc_in/fc_out or BERT intermediate.dense/output.dense) among the "
            f"selected modules {list(paths)[:4]}"
        )
    return removed


def _block_list_of(model: nn.Module, paths: Sequence[str]) -> tuple[str, nn.ModuleList, list[int]]:
    """The block list (a ModuleList) holding the selected modules, and its selected indices."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and name:
            selected = [i for i in range(len(module))
                        if any(_within(p, f"{name}.{i}") or _within(f"{name}.{i}", p) for p in paths)]
            if selected:
                found.append((name, module, selected))
    if len(found) != 1:
        raise ValueError(
            f"prune method=layers needs the selection inside one list of blocks; found {[f[0] for f in found]}"
        )
    return found[0]


@torch.no_grad()
def drop_blocks(model: nn.Module, paths: Sequence[str], record: Shrink, keep: Sequence[int]) -> int:
    """Remove the selected blocks not in `keep` (original indices) from the model's block list.

    The list is replaced by the kept blocks, in order: the model runs them back to back, so
    block i-1's output feeds block i+1. Run this after every edit that names modules by path
    (their paths use the original numbering); the removed blocks' weights are remembered so the
    saved state has every original key. Returns how many blocks were removed.
    """
    name, blocks, selected = _block_list_of(model, paths)
    if any(i >= len(blocks) for i in keep):
        raise ValueError(f"keep = {list(keep)} names blocks past the {len(blocks)} of {name}")
    kept = [i for i in range(len(blocks)) if i in keep or i not in selected]
    for i in range(len(blocks)):
        if i not in kept:
            for key, value in blocks[i].state_dict().items():
                record.removed[f"{name}.{i}.{key}"] = value.detach().cpu().clone()
    record.blocks[name] = kept
    _replace(model, name, nn.ModuleList([blocks[i] for i in kept]))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
    return len(blocks) - len(kept)


class LowRankLinear(nn.Module):
    """W (out x in) ~= up @ down with rank r, initialized from the truncated SVD of W."""

    def __init__(self, linear: nn.Linear, rank: int | None, energy: float | None):
        super().__init__()
        weight = linear.weight.detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        if rank is None:
            cumulative = (s**2).cumsum(0) / (s**2).sum()
            rank = int((cumulative < energy).sum().item()) + 1
        rank = min(rank, s.numel())
        root = s[:rank].sqrt()
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(root[:, None] * vh[:rank])
            self.up.weight.copy_(u[:, :rank] * root[None, :])
            if linear.bias is not None:
                self.up.bias.copy_(linear.bias)
        self.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def factor_low_rank(model: nn.Module, paths: Sequence[str], rank: int | None = None, energy: float | None = None) -> None:
    """Replace each selected Linear by a trainable LowRankLinear."""
    for path in paths:
        linear = _module(model, path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"lowrank applies to Linear layers; {path} is a {type(linear).__name__}")
        _replace(model, path, LowRankLinear(linear, rank, energy))


def _fake_quant(x: torch.Tensor, bits: int, symmetric: bool, dim: int | None, group: int | None) -> torch.Tensor:
    """Quantize-dequantize `x` to `bits` (per tensor, per row `dim=1` reductions, or per group)."""
    shape = x.shape
    if group is not None:
        x = x.reshape(-1, group)
    reduce = dict(dim=-1, keepdim=True) if (dim is not None or group is not None) else {}
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.detach().abs().amax(**reduce).clamp(min=1e-8) / qmax
        q = (x / scale).round().clamp(-qmax - 1, qmax) * scale
    else:
        qmax = 2**bits - 1
        low, high = x.detach().amin(**reduce), x.detach().amax(**reduce)
        scale = ((high - low) / qmax).clamp(min=1e-8)
        zero = (-low / scale).round()
        q = ((x / scale).round() + zero).clamp(0, qmax).sub(zero) * scale
    return q.reshape(shape)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward the quantized value, backward the identity (straight-through estimator)."""
    return x + (quantized - x).detach()


class FakeQuantLinear(nn.Linear):
    """A Linear trained quantization-aware: weights (and, unless weight-only, activations) are
    quantized-dequantized in the forward pass and gradients pass straight through.

    It takes over the original Linear's parameters, so names and state-dict keys are unchanged.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "int8", mode: str = "dynamic",
                    granularity: str = "per_channel", group_size: int = 32, symmetric: bool = True) -> FakeQuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.bits = 4 if scheme == "int4" else 8
        new.mode, new.granularity, new.group_size, new.symmetric = mode, granularity, group_size, symmetric
        if granularity == "per_group" and linear.in_features % group_size:
            raise ValueError(f"in_features {linear.in_features} is not a multiple of group_size {group_size}")
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        dim = 1 if self.granularity == "per_channel" else None
        group = self.group_size if self.granularity == "per_group" else None
        weight = straight_through(weight, _fake_quant(weight, self.bits, self.symmetric, dim, group))
        if self.mode != "weight_only":  # activations: 8-bit, asymmetric, range of this batch
            x = straight_through(x, _fake_quant(x, 8, False, None, None))
        return F.linear(x, weight, self.bias)


def fake_quantize(model: nn.Module, paths: Sequence[str], **options: Any) -> None:
    """Swap each selected Linear for a FakeQuantLinear sharing its parameters."""
    for path in paths:
        linear = _module(model, path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"quantize applies to Linear layers; {path} is a {type(linear).__name__}")
        _replace(model, path, FakeQuantLinear.from_linear(linear, **options))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered if it is sharded (a collective for DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class PruneMasks:
    """Unstructured (magnitude) or N:M masks on Linear weights, kept zero through training.

    Masks come from the weights' magnitudes; `apply()` after every optimizer step zeroes the
    pruned weights again. With schedule=gradual, `update(step)` recomputes the masks as
    sparsity ramps from 0 to the target (cubic ramp, Zhu & Gupta 2017) over `ramp_steps`.
    Compute the first masks on the whole model, then `bind()` to the parallelized one: FSDP and
    tensor parallelism replace parameters by sharded DTensors, which get their shard of the mask.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], method: str, sparsity: float = 0.5,
                 n: int = 2, m: int = 4, scope: str = "local", gradual: bool = False, ramp_steps: int = 0):
        self.paths = list(paths)
        self.weights = linear_weights(model, self.paths)
        self.method, self.target = method, sparsity
        self.n, self.m, self.scope, self.gradual = n, m, scope, gradual
        self.ramp_steps = max(1, ramp_steps)
        self.full_masks: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.fraction = -1.0

    def bind(self, model: nn.Module) -> None:
        """Act on `model`'s parameters from now on (only those it holds, for a pipeline stage)."""
        present = {name for name, _ in model.named_modules()}
        self.weights = linear_weights(model, [p for p in self.paths if p in present])
        self.masks = {name: self._like(self.full_masks[name], w) for name, w in self.weights.items()
                      if name in self.full_masks}
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs: how far the ramp was. The masks themselves are the zeros of
        the checkpointed weights, which `load_state_dict` reads back from the restored weights."""
        return {"fraction": self.fraction}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fraction = state["fraction"]
        self.masks = {name: (w.detach() != 0).to(w.dtype) for name, w in self.weights.items()}

    def fraction_at(self, step: int) -> float:
        if not self.gradual:
            return 1.0
        progress = min(1.0, step / self.ramp_steps)
        return 1.0 - (1.0 - progress) ** 3

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Recompute masks when the ramp moved by at least a tenth (or reached its end)."""
        fraction = self.fraction_at(step)
        if fraction == self.fraction or (fraction < 1.0 and fraction - self.fraction < 0.1):
            return
        self._compute(fraction)

    @torch.no_grad()
    def _compute(self, fraction: float) -> None:
        self.fraction = fraction
        full = {name: _full(w.detach()).float() for name, w in self.weights.items()}
        masks = self._nm_masks(full, fraction) if self.method == "nm" else self._magnitude_masks(full, fraction)
        self.full_masks.update({name: mask.cpu() for name, mask in masks.items()})
        self.masks = {name: self._like(mask, self.weights[name]) for name, mask in masks.items()}
        self.apply()

    def _magnitude_masks(self, full: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        sparsity = self.target * fraction
        if self.scope == "global":
            everything = torch.cat([w.abs().flatten() for w in full.values()])
            k = int(sparsity * everything.numel())
            threshold = everything.kthvalue(k).values if k > 0 else everything.new_tensor(-1.0)
            return {name: w.abs() > threshold for name, w in full.items()}
        masks = {}
        for name, w in full.items():
            k = int(sparsity * w.numel())
            threshold = w.abs().flatten().kthvalue(k).values if k > 0 else w.new_tensor(-1.0)
            masks[name] = w.abs() > threshold
        return masks

    def _nm_masks(self, full: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        zeros = int(round((self.m - self.n) * fraction))
        masks = {}
        for name, w in full.items():
            if w.shape[1] % self.m:
                raise ValueError(f"N:M pruning of {name}: in_features {w.shape[1]} is not a multiple of m={self.m}")
            groups = w.abs().reshape(-1, self.m)
            mask = torch.ones_like(groups, dtype=torch.bool)
            if zeros:
                mask.scatter_(1, groups.topk(zeros, dim=1, largest=False).indices, False)
            masks[name] = mask.reshape(w.shape)
        return masks

    @staticmethod
    def _like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The full mask in the weight's layout: a same-sharded DTensor for sharded weights."""
        mask = mask.to(device=_local(weight).device, dtype=weight.dtype)
        if hasattr(weight, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None)
        return mask

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    def sparsity(self) -> float:
        """Fraction of zero weights among the masked ones (local shards)."""
        zeros = sum(int((_local(w) == 0).sum()) for w in self.weights.values())
        total = sum(_local(w).numel() for w in self.weights.values())
        return zeros / max(1, total)


def linear_weights(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Parameter]:
    """`path.weight` -> Parameter for each selected Linear (the parameters masks act on)."""
    weights = {}
    for path in paths:
        module = _module(model, path)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"magnitude/nm pruning applies to Linear layers; {path} is a {type(module).__name__}")
        weights[f"{path}.weight"] = module.weight
    return weights


@torch.no_grad()
def dense_state_dict(state: dict[str, torch.Tensor], shrink: Shrink) -> dict[str, torch.Tensor]:
    """The trained weights laid out like the original model, so its factory can load them.

    Low-rank pairs are multiplied back into one weight; removed heads/channels come back as
    zero rows/columns (the function is unchanged: a zeroed head or channel contributes nothing),
    and a later structured prune finds them first. Kept blocks get their original indices back
    and removed blocks their weights from before training, so the original model loads the
    state and `prune { method = layers, keep = ... }` removes the same blocks again.
    """
    state = _renumber_blocks(state, shrink)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".down.weight"):
            prefix = key[: -len(".down.weight")]
            out[f"{prefix}.weight"] = state[f"{prefix}.up.weight"].float() @ value.float()
            continue
        if key.endswith(".up.weight"):
            continue
        if key.endswith(".up.bias"):
            out[key[: -len(".up.bias")] + ".bias"] = value
            continue
        out[key] = value
    for path, (dim, size, kept) in shrink.cuts.items():
        index = torch.tensor(kept)
        weight = out[f"{path}.weight"]
        shape = list(weight.shape)
        shape[dim] = size
        out[f"{path}.weight"] = weight.new_zeros(shape).index_copy_(dim, index, weight)
        if dim == 0 and f"{path}.bias" in out:
            bias = out[f"{path}.bias"]
            out[f"{path}.bias"] = bias.new_zeros(size).index_copy_(0, index, bias)
    return out


def _renumber_blocks(state: dict[str, torch.Tensor], shrink: Shrink) -> dict[str, torch.Tensor]:
    """Student keys `list.k.*` -> `list.<k-th kept index>.*`, plus the removed blocks' weights."""
    if not shrink.blocks:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for name, kept in shrink.blocks.items():
            head = name + "."
            if key.startswith(head):
                index, _, rest = key[len(head):].partition(".")
                if index.isdigit():
                    key = f"{head}{kept[int(index)]}.{rest}"
                break
        out[key] = value
    out.update(shrink.removed)
    return out


# ============================================================================ 5. distillation


class Distiller:
    """Knowledge distillation from a frozen teacher (the unmodified model).

    loss = (1 - alpha) * task + alpha * distill, where distill sums the requested terms:
      logits     KL(teacher || student) on softmax(logits / T), times T^2 (Hinton et al.)
      hidden     MSE between block outputs, student block i vs teacher block j per layer_map
      embedding  MSE between the final hidden states (sentence embeddings for encoders)
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float, alpha: float,
                 losses: Sequence[str], layer_map: Sequence[Sequence[int]]):
        if "attention" in losses:
            raise ValueError("attention distillation needs attention maps, which scaled_dot_product_attention does not expose")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha, self.losses = temperature, alpha, list(losses)
        self.layer_map = [tuple(pair) for pair in layer_map]
        if "hidden" in self.losses and not self.layer_map:
            n = len(find_blocks(student)[1])
            self.layer_map = [(i, i) for i in range(n)]
        self._student_hidden: dict[int, torch.Tensor] = {}
        self._teacher_hidden: dict[int, torch.Tensor] = {}
        if "hidden" in self.losses:
            self._hook(find_blocks(student)[1], {s for s, _ in self.layer_map}, self._student_hidden)
            self._hook(find_blocks(teacher)[1], {t for _, t in self.layer_map}, self._teacher_hidden)

    @staticmethod
    def _hook(blocks: nn.ModuleList, wanted: set[int], store: dict[int, torch.Tensor]) -> None:
        for i in wanted:
            def keep(_module, _inputs, output, i=i):
                store[i] = output[0] if isinstance(output, (tuple, list)) else output
            blocks[i].register_forward_hook(keep)

    def kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        vocab = student_logits.shape[-1]
        student = F.log_softmax(student_logits.float().reshape(-1, vocab) / t, dim=-1)
        teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / t, dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t

    def loss(self, student_out: Any, inputs: torch.Tensor, task_loss: torch.Tensor | None) -> torch.Tensor:
        """The combined loss for a micro-batch the student has just run on."""
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
        terms = []
        if "logits" in self.losses:
            terms.append(self.kl(logits_of(student_out), logits_of(teacher_out)))
        if "embedding" in self.losses:
            if hasattr(student_out, "last_hidden_state"):
                student_emb, teacher_emb = sentence_embedding(student_out), sentence_embedding(teacher_out)
            else:
                student_emb, teacher_emb = logits_of(student_out).float(), logits_of(teacher_out).float()
            terms.append(F.mse_loss(student_emb, teacher_emb))
        for s, t in self.layer_map if "hidden" in self.losses else ():
            terms.append(F.mse_loss(self._student_hidden[s].float(), self._teacher_hidden[t].float()))
        distill = torch.stack(terms).sum()
        if task_loss is None:
            return distill
        return (1 - self.alpha) * task_loss + self.alpha * distill


def hidden_states_of(output: Any) -> tuple[torch.Tensor, ...]:
    """(embeddings, block 0 output, block 1 output, ...) of a Hugging Face encoder run with
    output_hidden_states=True."""
    states = getattr(output, "hidden_states", None)
    if states is None:
        raise ValueError("the encoder returned no hidden states: call it with output_hidden_states=True")
    return tuple(states)


def _module_digest(module: nn.Module) -> str:
    """A digest of a module's weights: the teacher cache is valid for these weights only."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class _Ragged:
    """Per-sample tensors of different first dimensions, stored as one flat tensor + offsets."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def of(cls, pieces: list[torch.Tensor]) -> _Ragged:
        sizes = torch.tensor([p.shape[0] for p in pieces], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        return cls(torch.cat(pieces) if pieces else torch.zeros(0), offsets)

    def get(self, i: int) -> torch.Tensor:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]


class TeacherTargets:
    """The teacher's outputs on every sample of a SentenceSet, computed once before training.

    Kept per sample: the sentence embedding (mean-pooled, fp32), the hidden states of the
    teacher blocks in `layers` (fp16, real tokens only) and, for `attention_layers`, the
    head-averaged attention map (fp16, real tokens only). Training reads them by sample index
    (`gather`) instead of running the teacher every step; the set is saved under `cache_dir`
    by a key of the teacher's weights, the samples and the layers, so a later run loads it.
    """

    def __init__(self, embeddings: torch.Tensor, hidden: dict[int, _Ragged], attention: dict[int, _Ragged]):
        self.embeddings, self.hidden, self.attention = embeddings, hidden, attention

    @classmethod
    @torch.no_grad()
    def compute(cls, teacher: nn.Module, samples: SentenceSet, layers: Sequence[int], attention_layers: Sequence[int],
                device: torch.device, batch: int = 64) -> TeacherTargets:
        teacher.eval()
        order = sorted(range(len(samples)), key=lambda i: len(samples.ids[i]))
        embeddings = torch.zeros(len(samples), 0)
        hidden: dict[int, list[torch.Tensor | None]] = {t: [None] * len(samples) for t in layers}
        maps: dict[int, list[torch.Tensor | None]] = {t: [None] * len(samples) for t in attention_layers}
        for start in range(0, len(order), batch):
            chosen = order[start : start + batch]
            inputs = sentence_inputs(samples.collate(chosen), device)
            output = teacher(**inputs, output_hidden_states=True, output_attentions=bool(attention_layers))
            states = hidden_states_of(output)
            pooled = F.normalize(mean_pool(states[-1], inputs["attention_mask"]), dim=-1).cpu()
            if embeddings.shape[1] == 0:
                embeddings = torch.zeros(len(samples), pooled.shape[1])
            embeddings[chosen] = pooled
            lengths = inputs["attention_mask"].sum(1).tolist()
            for t in layers:
                for j, i in enumerate(chosen):
                    hidden[t][i] = states[t + 1][j, : lengths[j]].to(torch.float16).cpu()
            for t in attention_layers:
                mean = output.attentions[t].float().mean(1)
                for j, i in enumerate(chosen):
                    maps[t][i] = mean[j, : lengths[j], : lengths[j]].to(torch.float16).cpu().reshape(-1, 1)
        return cls(embeddings, {t: _Ragged.of(v) for t, v in hidden.items()},
                   {t: _Ragged.of(v) for t, v in maps.items()})

    @classmethod
    def cached(cls, teacher: nn.Module, samples: SentenceSet, layers: Sequence[int], attention_layers: Sequence[int],
               device: torch.device, cache_dir: Path | None) -> TeacherTargets:
        """`compute`, or its saved result for the same teacher weights, samples and layers."""
        if cache_dir is None:
            return cls.compute(teacher, samples, layers, attention_layers, device)
        key = f"{_module_digest(teacher)}-{samples.fingerprint()}-h{'.'.join(map(str, sorted(layers)))}" \
              f"-a{'.'.join(map(str, sorted(attention_layers)))}"
        path = cache_dir / f"{key}.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            log.info("teacher outputs for %d samples loaded from %s", len(samples), path)
            return cls(state["embeddings"],
                       {int(t): _Ragged(*v) for t, v in state["hidden"].items()},
                       {int(t): _Ragged(*v) for t, v in state["attention"].items()})
        started = time.perf_counter()
        targets = cls.compute(teacher, samples, layers, attention_layers, device)
        log.info("teacher outputs for %d samples computed in %.0f s", len(samples), time.perf_counter() - started)
        save_atomically({
            "embeddings": targets.embeddings,
            "hidden": {str(t): (r.flat, r.offsets) for t, r in targets.hidden.items()},
            "attention": {str(t): (r.flat, r.offsets) for t, r in targets.attention.items()},
        }, path)
        return targets

    def gather(self, indices: Sequence[int], width: int) -> dict[str, Any]:
        """Targets of samples `indices`, zero-padded to `width` tokens."""
        picked = list(indices)
        out: dict[str, Any] = {"embedding": self.embeddings[picked], "hidden": {}, "attention": {}}
        for t, ragged in self.hidden.items():
            rows = torch.zeros(len(picked), width, ragged.flat.shape[1])
            for j, i in enumerate(picked):
                piece = ragged.get(i)
                rows[j, : piece.shape[0]] = piece.float()
            out["hidden"][t] = rows
        for t, ragged in self.attention.items():
            maps = torch.zeros(len(picked), width, width)
            for j, i in enumerate(picked):
                piece = ragged.get(i).reshape(-1)
                n = int(round(piece.numel() ** 0.5))
                maps[j, :n, :n] = piece.float().reshape(n, n)
            out["attention"][t] = maps
        return out


class EncoderDistiller:
    """Distillation of an encoder from cached teacher outputs (see TeacherTargets).

    loss = sum of weight x term over the requested terms:
      embedding   1 - cosine (or MSE) between mean-pooled sentence embeddings
      similarity  MSE between the batch's pairwise cosine-similarity matrices (off-diagonal):
                  what similarity search and ranking see
      hidden      per layer_map pair (student block s, teacher block t): squared error of the
                  block outputs over real tokens, relative to the teacher's squared norm
      attention   per layer_map pair: KL(teacher || student) of the head-averaged attention
                  maps (robust to pruned heads), over real query tokens
    Student layers count the student's blocks (after layer dropping), teacher layers the
    original model's.
    """

    def __init__(self, teacher: nn.Module, losses: Sequence[str], layer_map: Sequence[Sequence[int]],
                 weights: dict[str, float], embedding_metric: str = "cosine", cache_teacher: bool = True,
                 student_blocks: int | None = None, **_unused: Any):
        self.teacher = teacher.eval().requires_grad_(False)
        self.losses, self.weights, self.metric = list(losses), dict(weights), embedding_metric
        self.cache_teacher = cache_teacher
        self.layer_map = [tuple(pair) for pair in layer_map]
        needs_map = {"hidden", "attention"} & set(self.losses)
        if needs_map and not self.layer_map:
            count = student_blocks if student_blocks is not None else len(find_blocks(teacher)[1])
            self.layer_map = [(i, i) for i in range(count)]
        teacher_blocks = len(find_blocks(teacher)[1])
        for s, t in self.layer_map:
            if t >= teacher_blocks or (student_blocks is not None and s >= student_blocks):
                raise ValueError(f"layer_map pair [{s}, {t}]: the student has {student_blocks} blocks, the teacher {teacher_blocks}")
        if "attention" in self.losses:
            self.teacher.set_attn_implementation("eager")  # sdpa does not return attention maps
        self.targets: dict[str, TeacherTargets] = {}
        self.local: dict[str, dict[int, int]] = {}

    @property
    def hidden_layers(self) -> list[int]:
        return sorted({t for _, t in self.layer_map}) if "hidden" in self.losses else []

    @property
    def attention_layers(self) -> list[int]:
        return sorted({t for _, t in self.layer_map}) if "attention" in self.losses else []

    def prepare_student(self, student: nn.Module) -> None:
        """Make the student return what the losses compare (attention maps need eager attention)."""
        if "attention" in self.losses:
            student.set_attn_implementation("eager")

    def prepare(self, name: str, samples: SentenceSet, indices: Sequence[int], device: torch.device,
                cache_dir: Path | None) -> None:
        """Compute (or load) the teacher's outputs on samples `indices` (this rank's share),
        kept under `name`; with `cache_teacher`, also saved in `cache_dir` for later runs."""
        self.teacher.to(device)
        indices = list(indices)
        self.local[name] = {index: position for position, index in enumerate(indices)}
        self.targets[name] = TeacherTargets.cached(
            self.teacher, samples.subset(indices), self.hidden_layers, self.attention_layers, device,
            cache_dir if self.cache_teacher else None)

    def _targets(self, name: str, batch: dict[str, torch.Tensor], width: int) -> dict[str, Any]:
        local = self.local[name]
        return self.targets[name].gather([local[i] for i in batch["index"].tolist()], width)

    def student_options(self) -> dict[str, bool]:
        return {"output_hidden_states": True, "output_attentions": "attention" in self.losses}

    def terms(self, output: Any, batch: dict[str, torch.Tensor], name: str = "train") -> dict[str, torch.Tensor]:
        """Each requested loss term for a batch the student has just run on (unweighted)."""
        mask = batch["attention_mask"]
        states = hidden_states_of(output)
        device = states[-1].device
        mask = mask.to(device)
        target = self._targets(name, batch, mask.shape[1])
        pooled = mean_pool(states[-1], mask)
        student = F.normalize(pooled, dim=-1)
        teacher = target["embedding"].to(device)
        terms: dict[str, torch.Tensor] = {}
        if "embedding" in self.losses:
            if self.metric == "cosine":
                terms["embedding"] = (1 - (student * teacher).sum(-1)).mean()
            else:
                terms["embedding"] = F.mse_loss(student, teacher) * student.shape[-1]
        if "similarity" in self.losses and len(student) > 1:
            off = ~torch.eye(len(student), dtype=torch.bool, device=device)
            terms["similarity"] = F.mse_loss((student @ student.t())[off], (teacher @ teacher.t())[off])
        real = mask.to(torch.float32).unsqueeze(-1)
        if "hidden" in self.losses:
            errors = []
            for s, t in self.layer_map:
                want = target["hidden"][t].to(device)
                diff = (states[s + 1].float() - want).pow(2) * real
                errors.append(diff.sum() / (want.pow(2) * real).sum().clamp(min=1e-6))
            terms["hidden"] = torch.stack(errors).mean()
        if "attention" in self.losses:
            divergences = []
            for s, t in self.layer_map:
                want = target["attention"][t].to(device)
                got = output.attentions[s].float().mean(1)
                kl = (want * (torch.log(want + 1e-8) - torch.log(got + 1e-8))).sum(-1)
                divergences.append((kl * real.squeeze(-1)).sum() / real.sum())
            terms["attention"] = torch.stack(divergences).mean()
        return terms

    def loss(self, output: Any, batch: dict[str, torch.Tensor], name: str = "train") -> torch.Tensor:
        terms = self.terms(output, batch, name)
        return torch.stack([self.weights.get(k, 1.0) * v for k, v in terms.items()]).sum()

    @torch.no_grad()
    def cosines(self, output: Any, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """Cosine between each sample's student and teacher sentence embeddings."""
        states = hidden_states_of(output)
        student = F.normalize(mean_pool(states[-1], batch["attention_mask"].to(states[-1].device)), dim=-1)
        local = self.local[name]
        teacher = self.targets[name].embeddings[[local[i] for i in batch["index"].tolist()]].to(student.device)
        return (student * teacher).sum(-1)


def set_dropout(model: nn.Module, probability: float) -> None:
    """Set every dropout of the model: its nn.Dropout modules, and the `attention_dropout`
    probability some Hugging Face attentions (e.g. Llama's) read at call time instead."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = probability


def freeze(model: nn.Module, patterns: Sequence[str]) -> int:
    """Stop training the parameters whose module path matches one of the globs; returns how many."""
    from fnmatch import fnmatchcase

    count = 0
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if any(fnmatchcase(owner, p) or fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
            count += param.numel()
    return count


# ============================================================================ 6. step mechanics


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of storing them.

    Overrides the block's `forward` on the instance, so parameter names (and checkpoints) are
    unchanged and FSDP/DDP hooks still run.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        forward = block.forward

        def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   betas: Sequence[float], momentum: float) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on matrices only (not on biases, norms or 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def lr_multiplier(step: int, total: int, warmup: int, decay: str, min_ratio: float) -> float:
    """Linear warmup to the peak, then cosine/linear decay to `min_ratio` of it (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1 - min_ratio) * progress


def make_grad_scaler(device: torch.device, synced: bool, init_scale: float = 2.0**16,
                     growth_interval: int = 2000) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16: the scale halves (and the step is skipped) on overflow and
    doubles after `growth_interval` clean steps. `synced`: ranks hold different gradients (FSDP
    shards, pipeline stages, tensor-parallel shards), so an overflow anywhere skips the step everywhere."""
    if synced:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=device.type, init_scale=init_scale, growth_interval=growth_interval,
                                   process_group=dist.group.WORLD)
    else:
        scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval)
    scaler.scale(torch.zeros((), device=device))  # create the scale now: early pipeline stages never scale a loss
    return scaler


@torch.no_grad()
def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float | None, group: Any = None) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (None: only measure it); returns the norm.

    Sharded (DTensor) gradients count once across their shards, replicated ones once per rank;
    `group` (the pipeline group) adds up the norms of the stages, which hold different weights.
    Everything stays on the device: no synchronization per step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    squared = torch.zeros((), dtype=torch.float32, device=_local(grads[0]).device)
    if plain:
        squared += torch.nn.utils.get_total_norm(plain, foreach=True).float() ** 2
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for g in sharded:  # norms of DTensors combine only within one device mesh (2-D FSDP x TP has two)
        by_mesh.setdefault(g.device_mesh, []).append(g)
    for group_grads in by_mesh.values():
        squared += _full(torch.nn.utils.get_total_norm(group_grads, foreach=True)).float() ** 2
    if group is not None:
        dist.all_reduce(squared, group=group)
    total = squared.sqrt()
    if max_norm is not None:
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if plain:
            torch._foreach_mul_(plain, factor.to(plain[0].dtype))
        for g in sharded:
            g.mul_(factor.to(g.dtype))
    return total


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Mixed precision compute for bf16/fp16; parameters (master weights) stay fp32."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield


# ============================================================================ 7. parallelism


def wrap_ddp(model: nn.Module, par: Parallel, find_unused_parameters: bool = False) -> nn.Module:
    """Data parallel: all-reduce gradients over the data-parallel group (bucketed, overlapped with
    backward). `find_unused_parameters` for models whose loss skips some weights (an encoder's pooler)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        process_group=par.mesh["dp"].get_group(),
        device_ids=[par.device.index] if par.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


@torch.no_grad()
def all_reduce_grads(params: Sequence[torch.Tensor], par: Parallel) -> None:
    """Average gradients over the data-parallel ranks in one flattened all-reduce.

    Pipeline replicas use this instead of the DistributedDataParallel wrapper, whose reducer
    trips over the extra backward pass the pipeline runs to infer gradient shapes.
    """
    if par.dp_size == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=par.mesh["dp"].get_group())
    flat /= par.dp_size
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def shard_fsdp(model: nn.Module, blocks: Sequence[nn.Module], par: Parallel, precision: str) -> nn.Module:
    """FSDP2: shard each block, then the root, over the data-parallel mesh dimension.

    bf16/fp16 run through MixedPrecisionPolicy (params cast for compute, gradients reduced in fp32);
    the sharded fp32 parameters are the master weights the optimizer updates.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=par.mesh["dp"], mp_policy=policy)
    fully_shard(model, mesh=par.mesh["dp"], mp_policy=policy)
    return model


#: Column-parallel (split by output rows) and row-parallel (split by input columns) Linears of
#: a block, in a fixed order: every rank must distribute them in the same sequence.
TENSOR_PLAN_COLWISE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")
TENSOR_PLAN_ROWWISE = ("attn.out_proj", "mlp.fc_out")


def parallelize_tensor(blocks: Sequence[nn.Module], par: Parallel) -> None:
    """Megatron-style tensor parallelism inside every block.

    q/k/v and fc_in are split by output rows (ColwiseParallel), out_proj and fc_out by input
    columns (RowwiseParallel, which all-reduces their outputs): each rank computes
    n_head / tp heads and d_ff / tp MLP channels. The attention infers its head count from the
    shapes, so it runs unchanged on the local heads.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in blocks:
        names = {n for n, _ in block.named_modules()}
        missing = [n for n in TENSOR_PLAN_COLWISE + TENSOR_PLAN_ROWWISE if n not in names]
        if missing:
            raise ValueError(
                f"tensor parallelism needs blocks with {TENSOR_PLAN_COLWISE + TENSOR_PLAN_ROWWISE}; "
                f"{type(block).__name__} lacks {missing}"
            )
        plan: dict[str, Any] = {n: ColwiseParallel() for n in TENSOR_PLAN_COLWISE}
        plan.update({n: RowwiseParallel() for n in TENSOR_PLAN_ROWWISE})
        parallelize_module(block, par.mesh["tp"], plan)


def split_blocks(num_blocks: int, stages: int, cuts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[first, last) block ranges of each stage: the given cut points, or contiguous groups
    whose sizes differ by at most one (earlier stages take the extra blocks)."""
    if cuts:
        bounds = [0, *cuts, num_blocks]
    else:
        base, extra = divmod(num_blocks, stages)
        sizes = [base + (1 if i < extra else 0) for i in range(stages)]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if len(ranges) != stages or any(first >= last for first, last in ranges):
        raise ValueError(f"cannot split {num_blocks} blocks into {stages} non-empty pipeline stages (cuts {cuts})")
    return ranges


class DecoderStage(nn.Module):
    """Blocks [first, last) of a decoder laid out like examples/models/gpt.py.

    Stage 0 also embeds the token ids, the last stage also applies the final norm and the LM
    head; stages pass the hidden state [batch, seq, d_model] to each other. Attribute names are
    the model's, so state-dict keys (and checkpoints) are those of the whole model.
    """

    def __init__(self, model: nn.Module, first: int, last: int):
        super().__init__()
        needed = ("tok_emb", "pos_emb", "blocks", "ln_f", "lm_head", "_mask")
        missing = [n for n in needed if not hasattr(model, n)]
        if missing:
            raise ValueError(
                "pipeline parallelism splits decoders laid out like examples/models/gpt.py "
                f"({', '.join(needed)}); {type(model).__name__} lacks {missing}"
            )
        self.is_first, self.is_last = first == 0, last == len(model.blocks)
        if self.is_first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first, last)})
        if self.is_last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head
        self._causal_mask = model._mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            batch, seq = x.shape
            positions = torch.arange(seq, device=x.device).expand(batch, seq)
            x = self.tok_emb(x) + self.pos_emb(positions)
        batch, seq = x.shape[:2]
        mask = self._causal_mask(batch, seq, 0, None, x.device)
        for block in self.blocks.values():
            x = block(x, mask)[0]
        return self.lm_head(self.ln_f(x)) if self.is_last else x


# ============================================================================ 8. checkpoints


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Periodic checkpoints in `root/step_00000050/`, written to `step_....tmp/` then renamed.

    A directory without `.tmp` is complete by construction, so resuming picks the newest such
    directory. `sharded=False`: rank 0 torch.saves the (replicated) model and optimizer;
    `sharded=True`: every rank writes its shards with torch.distributed.checkpoint (FSDP,
    tensor and pipeline parallel). Progress (step, scheduler, scaler, RNG) goes to `extra.pt`.
    """

    def __init__(self, root: Path, keep: int, sharded: bool, par: Parallel):
        self.root, self.keep, self.sharded, self.par = root, keep, sharded, par

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(model, optimizer, options=_dcp_options())
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        elif self.par.is_main:
            torch.save({"model": _unwrap(model).state_dict(), "optim": optimizer.state_dict()}, tmp / "state.pt")
        if self.par.is_main:
            torch.save(extra, tmp / "extra.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint into model and optimizer; its `extra`, or None."""
        found = self.complete()
        if not found:
            return None
        latest = found[-1]
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(model, optimizer, options=_dcp_options())
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=str(latest))
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=_dcp_options())
        else:
            state = torch.load(latest / "state.pt", map_location=self.par.device, weights_only=False)
            _unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
        return torch.load(latest / "extra.pt", map_location="cpu", weights_only=False)


def _dcp_options() -> Any:
    """Optimizer state keyed by parameter name, not group index: pipeline stages hold different
    parameters in same-numbered groups, which would collide in one checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(model: nn.Module, par: Parallel, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on rank 0 (empty elsewhere); a collective when sharded.

    Pipeline stages each hold part of the model: rank 0 gathers the parts of its pipeline.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Unsharded on every rank of the group (cpu_offload would keep only global rank 0's,
        # losing the other pipeline stages).
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        state = {k: v.detach().cpu() for k, v in state.items()}
    else:
        state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    if par.pp_size > 1:
        parts: list[Any] = [None] * par.pp_size
        group = par.mesh["pp"].get_group()
        holder = state if (par.dp_rank == 0 and par.tp_rank == 0) else {}
        dist.all_gather_object(parts, holder, group=group)
        state = {k: v for part in parts for k, v in part.items()}
    return state if par.is_main else {}


# ============================================================================ 9. logging and faults


class MetricsLog:
    """JSON lines on rank 0: one record per logged step, plus events (start, resume, eval, done)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ProgressBar:
    """A tqdm bar on rank 0 (a no-op elsewhere, or if tqdm is missing)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                pass

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepTimer:
    """Wall time of one optimizer step (synchronizing CUDA so the time is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def restart(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def maybe_fail(step: int, rank: int) -> None:
    """Fault injection for tests: with PLANC_FAIL_AT_STEP=k (and PLANC_FAIL_RANK, default 1), that
    rank exits at step k on the job's first attempt, so torchrun restarts it from a checkpoint."""
    at = os.environ.get("PLANC_FAIL_AT_STEP")
    if at is None or step != int(at) or rank != int(os.environ.get("PLANC_FAIL_RANK", "1")):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        log.error("PLANC_FAIL_AT_STEP=%s: rank %d exits on purpose", at, rank)
        os._exit(17)


def global_mean(total: torch.Tensor, count: int, par: Parallel) -> float:
    """sum(total) / sum(count) over the ranks holding a loss (see `loss_weight`): a mean over
    every evaluated sequence, whatever the parallel layout."""
    holds = 1.0 if loss_weight(par) > 0 else 0.0
    both = torch.tensor([float(total) * holds, count * holds], dtype=torch.float64, device=par.device)
    if dist.get_world_size() > 1:
        dist.all_reduce(both)
    return float(both[0] / both[1].clamp(min=1))


def mean_over(value: torch.Tensor, weight: float, device: torch.device) -> float:
    """All-reduce `value * weight` over the world: the weight is 1/dp on the ranks that hold the
    value (last pipeline stage, first tensor-parallel rank) and 0 elsewhere, giving the mean."""
    total = torch.as_tensor(value, dtype=torch.float64, device=device).detach() * weight
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total)


def loss_weight(par: Parallel) -> float:
    """This rank's weight in `mean_over`: the loss lives on the last pipeline stage, once per
    tensor-parallel group, and is averaged over the data-parallel ranks."""
    holds_loss = par.pp_rank == par.pp_size - 1 and par.tp_rank == 0
    return 1.0 / par.dp_size if holds_loss else 0.0
