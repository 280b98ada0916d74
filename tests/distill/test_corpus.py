"""Sentence corpora for encoder distillation: offline, filtered, deduplicated, never the eval set."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from planc.backends.train import planc_runtime as rt
from planc.backends.train.planc_runtime import corpus
from distill_helpers import HELDOUT, MODEL_SPEC, SENTENCES, REPO
from planc.dsl.parser import parse_file  # noqa: F401  (the plans below must parse)
from planc.compiler.validate import load_plan


def data(path: Path, **extra) -> dict:
    base = {"path": str(path), "glob": "*.txt", "tokenizer": "model", "seq_len": 128, "max_bytes": 200_000,
            "heldout": 0.1, "corpora": [], "exclude": [], "min_words": 5, "max_words": 60, "augment": [],
            "augment_fraction": 0.5}
    return {**base, **extra}


def test_prose_filter_keeps_sentences_and_drops_code():
    text = ("The cache keeps recent results. It is cleared now.\n\n"
            "def f(x): return x[0]\n\nCall foo_bar() with `x=1` to see http://example.com output.\n\n"
            "Short one. THIS IS ALL SHOUTING IN CAPITALS HERE OK.")
    assert rt.prose_sentences(text, 5, 60) == ["The cache keeps recent results."]
    assert rt.prose_sentences(text, 3, 60)[:2] == ["The cache keeps recent results.", "It is cleared now."]


def test_corpus_never_contains_a_heldout_sentence(tmp_path):
    heldout = HELDOUT.read_text().splitlines()
    mixed = tmp_path / "mixed.txt"  # a training file that (wrongly) holds evaluation sentences
    mixed.write_text("\n".join(SENTENCES.read_text().splitlines()[:40] + heldout[:10] + [heldout[3].upper()]))
    sentences = rt.collect_sentences(data(mixed, exclude=[str(HELDOUT)], corpora=["pydoc_topics"]), tmp_path,
                                     cache=False)
    normalized = {" ".join(s.lower().split()) for s in sentences}
    assert not normalized & {" ".join(s.lower().split()) for s in heldout}
    assert len([s for s in sentences if s in SENTENCES.read_text()]) == 40
    assert len(sentences) > 300  # the help topics added prose
    assert len(normalized) == len(sentences)  # no duplicates


def test_example_plans_exclude_the_heldout_file():
    for plan_file in ("minilm_prune_distill_int8.plan", "minilm_layerdrop_distill_int8.plan"):
        plan, _ = load_plan(REPO / "examples" / plan_file)
        train = plan.target("train").options
        excluded = {(plan.model.base_dir / name).resolve() for name in train.data.exclude}
        assert HELDOUT.resolve() in excluded
        assert (plan.model.base_dir / train.data.path).resolve() != HELDOUT.resolve()


def test_corpus_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANC_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "s.txt"
    source.write_text(SENTENCES.read_text())
    options = data(source)
    first = rt.collect_sentences(options, tmp_path)
    assert list((tmp_path / "cache" / "corpus").glob("*.json"))
    monkeypatch.setattr(corpus, "_collect_sentences", lambda *a: pytest.fail("the cached corpus was not used"))
    assert rt.collect_sentences(options, tmp_path) == first
    source.write_text(SENTENCES.read_text() + "\nA brand new sentence was added to the file today.\n")
    monkeypatch.undo()
    monkeypatch.setenv("PLANC_CACHE", str(tmp_path / "cache"))
    assert len(rt.collect_sentences(options, tmp_path)) == len(first) + 1  # a changed file is read again


@pytest.mark.parametrize("kind", ["word_dropout", "span_shuffle", "word_swap"])
def test_augmentations_alter_sentences_deterministically(kind):
    sentence = "The bakery on the corner sells out of sourdough before nine every morning."
    vocabulary = ["apple", "river", "window", "garden"]
    first = [rt.augment_sentence(sentence, kind, random.Random(3), vocabulary) for _ in range(2)]
    assert first[0] == first[1] != sentence
    words = first[0].split()
    if kind == "word_dropout":
        assert len(words) < len(sentence.split())
    else:
        assert len(words) == len(sentence.split())
    if kind == "span_shuffle":
        assert sorted(words) == sorted(sentence.split())


def test_sentence_set_batches_are_sharded_seeded_and_padded_per_batch(tmp_path):
    source = tmp_path / "s.txt"
    source.write_text(SENTENCES.read_text())
    train, heldout = rt.load_sentence_corpus(data(source, augment=["word_dropout"]), MODEL_SPEC, tmp_path)
    assert len(heldout) == 12 and 108 < len(train) < 2 * 108  # 10% held out; augmented copies added
    assert not {tuple(r) for r in heldout.ids} & {tuple(r) for r in train.ids[:108]}
    streams = [rt.SentenceBatches(train, 8, rank, 2, seed=5) for rank in (0, 1)]
    assert not set(streams[0].shard) & set(streams[1].shard)
    batch = streams[0].batch(3)
    again = rt.SentenceBatches(train, 8, 0, 2, seed=5).batch(3)  # a resumed run sees the same batch
    assert batch["index"].tolist() == again["index"].tolist()
    assert set(batch["index"].tolist()) <= set(streams[0].shard)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())  # padded to its own longest sentence
    for row, index in zip(batch["input_ids"], batch["index"]):
        assert row[: len(train.ids[index])].tolist() == train.ids[index]


def test_everyday_grammar_is_seeded_prose_and_never_echoes_the_heldout_set(tmp_path):
    from planc.backends.train.planc_runtime import everyday_text

    generated = everyday_text.sentences(5000)
    assert generated == everyday_text.sentences(5000) and len(set(generated)) == 5000
    assert everyday_text.sentences(200, seed=1) != generated[:200]
    assert len(rt.prose_sentences("\n\n".join(generated), 5, 60)) >= 0.9 * len(generated)

    def four_grams(sentence: str) -> set[tuple[str, ...]]:
        words = sentence.lower().strip(".?!").replace(",", "").split()
        return {tuple(words[i : i + 4]) for i in range(len(words) - 3)}

    seen = set().union(*map(four_grams, everyday_text.sentences()))
    echoed = [s for s in HELDOUT.read_text().splitlines() if s.strip() and four_grams(s) & seen]
    assert not echoed, echoed[:3]
    options = data(SENTENCES, corpora=["everyday"], max_bytes=20_000)
    mixed = rt.collect_sentences(options, tmp_path, cache=False)
    assert len(mixed) > 200 and set(mixed) & set(everyday_text.sentences())


def test_corpus_cache_follows_the_everyday_grammar(tmp_path, monkeypatch):
    """A changed grammar is a changed corpus: its stamp (the cache key) changes with the file."""
    grammar = tmp_path / "everyday_text.py"
    grammar.write_text("one grammar")
    monkeypatch.setattr(corpus, "__file__", str(tmp_path / "corpus.py"))
    options = data(SENTENCES, corpora=["everyday"])
    before = corpus._sources_stamp(options, tmp_path)
    assert corpus._sources_stamp(data(SENTENCES), tmp_path) != before
    grammar.write_text("another grammar")
    assert corpus._sources_stamp(options, tmp_path) != before
