"""Offline corpora from the Python installation."""

from __future__ import annotations

from planc.compiler import textdata


def test_stdlib_text_is_real_python_capped_in_bytes():
    text = textdata.stdlib_text(200_000)
    assert 190_000 <= len(text.encode("utf-8")) <= 200_000
    assert "def " in text and "import " in text
    documents = textdata.stdlib_documents(50_000)
    assert len(documents) >= 2 and sum(len(d.encode("utf-8")) for d in documents) <= 50_000
    assert documents == textdata.stdlib_documents(50_000)
    assert all("/test/" not in p.as_posix() for p in textdata.stdlib_files())


def test_stdlib_docstrings_are_distinct_prose_sentences():
    sentences = textdata.stdlib_docstrings(300)
    assert len(sentences) == 300 and len(set(sentences)) == 300
    for sentence in sentences:
        assert 5 <= len(sentence.split()) <= 40
        assert sentence[0].isupper() and sentence[-1] in ".!?"
        assert ">>>" not in sentence and "=" not in sentence
    assert textdata.stdlib_docstrings(300) == sentences
