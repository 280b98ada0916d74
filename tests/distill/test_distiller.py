"""Encoder distillation: the teacher runs once per sentence, the loss falls, the student nears it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from planc.backends.train import planc_runtime as rt
from distill_helpers import MODEL_SPEC, SENTENCES


def corpus(tmp_path, lines: int = 64):
    source = tmp_path / "s.txt"
    source.write_text("\n".join(SENTENCES.read_text().splitlines()[:lines]))
    data = {"path": str(source), "glob": "*.txt", "tokenizer": "model", "seq_len": 64, "max_bytes": 100_000,
            "heldout": 0.0, "corpora": [], "exclude": [], "min_words": 3, "max_words": 60, "augment": [],
            "augment_fraction": 0.5}
    return rt.load_sentence_corpus(data, MODEL_SPEC, tmp_path)[0]


class CountingTeacher(torch.nn.Module):
    """Wraps the teacher and counts how many sentences it encodes."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.sentences = model, 0
        self.encoder = model.encoder  # find_blocks looks for the block list

    def forward(self, **inputs):
        self.sentences += len(inputs["input_ids"])
        return self.model(**inputs)


def test_teacher_runs_once_per_sentence_and_is_cached_on_disk(minilm, tmp_path):
    model, _, _, _ = minilm
    samples = corpus(tmp_path, 40)
    teacher = CountingTeacher(copy.deepcopy(model))
    distiller = rt.EncoderDistiller(teacher, ["embedding", "hidden"], [[0, 1], [1, 3], [2, 5]], {}, student_blocks=3)
    distiller.prepare("train", samples, range(len(samples)), torch.device("cpu"), tmp_path / "teacher")
    assert teacher.sentences == len(samples)
    student = copy.deepcopy(model)
    rt.drop_blocks(student, ["encoder.layer"], rt.Shrink(), keep=[1, 3, 5])
    stream = rt.SentenceBatches(samples, 8, 0, 1, seed=0)
    for step in range(2 * stream.per_epoch):  # two epochs: no teacher run at all
        batch = stream.batch(step)
        distiller.loss(student(**rt.sentence_inputs(batch, torch.device("cpu")), **distiller.student_options()), batch)
    assert teacher.sentences == len(samples)
    again = rt.EncoderDistiller(teacher, ["embedding", "hidden"], [[0, 1], [1, 3], [2, 5]], {}, student_blocks=3)
    again.prepare("train", samples, range(len(samples)), torch.device("cpu"), tmp_path / "teacher")
    assert teacher.sentences == len(samples)  # loaded from disk
    torch.testing.assert_close(again.targets["train"].embeddings, distiller.targets["train"].embeddings)

    # The cached targets are the teacher's own outputs.
    batch = samples.collate([3, 7])
    with torch.no_grad():
        out = model(**rt.sentence_inputs(batch, torch.device("cpu")), output_hidden_states=True)
    want = F.normalize(rt.mean_pool(out.last_hidden_state, batch["attention_mask"]), dim=-1)
    got = distiller._targets("train", batch, batch["input_ids"].shape[1])
    torch.testing.assert_close(got["embedding"], want, rtol=1e-5, atol=1e-5)
    real = batch["attention_mask"].unsqueeze(-1)
    torch.testing.assert_close(got["hidden"][3] * real, out.hidden_states[4] * real, rtol=2e-3, atol=2e-3)


def test_loss_falls_and_cosine_to_the_teacher_rises(minilm, tmp_path):
    model, _, _, _ = minilm
    torch.manual_seed(0)
    samples = corpus(tmp_path, 48)
    student = copy.deepcopy(model).train()
    shrink = rt.Shrink()
    rt.shrink_mlp_channels(student, [f"encoder.layer.{i}.intermediate" for i in range(6)], shrink, 0.5)
    rt.drop_blocks(student, ["encoder.layer"], shrink, keep=[1, 3, 5])
    rt.freeze(student, ["embeddings.*", "pooler.*"])
    distiller = rt.EncoderDistiller(copy.deepcopy(model), ["embedding", "similarity", "hidden"], [[0, 1], [1, 3], [2, 5]],
                                    {"hidden": 0.5}, student_blocks=3)
    distiller.prepare("train", samples, range(len(samples)), torch.device("cpu"), None)
    batch = samples.collate(list(range(16)))
    inputs = rt.sentence_inputs(batch, torch.device("cpu"))

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            output = student(**inputs, **distiller.student_options())
            return float(distiller.loss(output, batch)), float(distiller.cosines(output, batch, "train").mean())

    loss_before, cosine_before = measure()
    optimizer = rt.make_optimizer(student, "adamw", 1e-3, 0.0, [0.9, 0.95], 0.9)
    stream = rt.SentenceBatches(samples, 8, 0, 1, seed=0)
    for step in range(10):
        b = stream.batch(step)
        loss = distiller.loss(student(**rt.sentence_inputs(b, torch.device("cpu")), **distiller.student_options()), b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_after, cosine_after = measure()
    assert loss_after < 0.7 * loss_before
    assert cosine_after > cosine_before + 0.05


def test_attention_term_compares_head_averaged_maps(minilm, tmp_path):
    model, _, _, _ = minilm
    samples = corpus(tmp_path, 16)
    distiller = rt.EncoderDistiller(copy.deepcopy(model), ["attention"], [], {}, student_blocks=6)
    distiller.prepare("train", samples, range(len(samples)), torch.device("cpu"), None)
    student = copy.deepcopy(model)
    distiller.prepare_student(student)
    batch = samples.collate([0, 1, 2])
    with torch.no_grad():
        same = distiller.terms(student(**rt.sentence_inputs(batch, torch.device("cpu")), **distiller.student_options()), batch)
        rt.shrink_attention_heads(student, ["encoder"], rt.Shrink(), 0.5)
        pruned = distiller.terms(student(**rt.sentence_inputs(batch, torch.device("cpu")), **distiller.student_options()), batch)
    assert float(same["attention"]) < 1e-3 < float(pruned["attention"])  # the teacher matches itself
