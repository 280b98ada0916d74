"""The bundled text sets stay apart: calibration/training text, the development set (options are
chosen on it) and the test set (published figures) share no sentence."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SETS = {"calibration": "sentences.txt", "development": "dev_sentences.txt", "test": "test_sentences.txt"}


def sentences(name: str) -> list[str]:
    """A file's lines, normalized the way a near-copy would still match (case, spacing, punctuation)."""
    lines = (DATA / SETS[name]).read_text(encoding="utf-8").splitlines()
    return [re.sub(r"[^a-z0-9]+", " ", line.lower()).strip() for line in lines]


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(SETS, 2)))
def test_no_sentence_is_in_two_sets(first: str, second: str) -> None:
    shared = set(sentences(first)) & set(sentences(second))
    assert not shared, f"{SETS[first]} and {SETS[second]} share {sorted(shared)}"


@pytest.mark.parametrize("name", SETS)
def test_each_set_is_sentences_without_repeats_or_blanks(name: str) -> None:
    lines = sentences(name)
    assert lines and all(lines) and len(set(lines)) == len(lines)


def test_the_paired_sets_are_groups_of_four() -> None:
    """dev and test are groups of (A, paraphrase of A, B, paraphrase of B): the Spearman metric needs it."""
    assert len(sentences("development")) % 4 == 0 and len(sentences("test")) % 4 == 0
