"""Distillation from the frozen original model (the teacher).

Distiller          decoders (and encoders without a sentence corpus): runs the teacher next to
                   the student every step; logits KL, hidden-state and embedding MSE
EncoderDistiller   encoders on sentences: embedding, similarity, hidden and attention terms
                   against teacher outputs computed once before training
TeacherTargets     those outputs per sample, cached on disk by the teacher's weights, the
                   samples and the layers (the teacher cache)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import save_atomically
from .data import SentenceSet, mean_pool, sentence_inputs
from .model import find_blocks, logits_of, sentence_embedding

log = logging.getLogger("planc.train")


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
