"""The corpus: loading files, the train/eval split by document, token windows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import make_text
from saesweep.data.corpus import (
    Document,
    is_eval_document,
    iter_documents,
    prepare_corpus,
    read_split,
    write_split,
    token_windows,
    window_blocks,
)
from saesweep.core.errors import UserError


class WordTokenizer:
    """Each word of a text is one token: its length (so ids are known by hand)."""

    def __init__(self, bos: int | None = 90, eos: int | None = 99) -> None:
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False, "windows must be built from the raw text tokens"
        return {"input_ids": [len(word) for word in text.split()]}


def files_corpus(folder: Path, **extra) -> dict:
    return {"name": "t", "source": "files", "include": [f"{folder}/*.txt"], "eval_fraction": 0.25,
            "max_documents": None, **extra}


def split_documents(documents: list[Document], eval_fraction: float, folder: Path) -> tuple[list[Document], list[Document]]:
    """(train, eval) as ``write_split`` writes them into ``folder``."""
    write_split(iter(documents), eval_fraction, folder)
    return list(read_split(folder / "train.jsonl")), list(read_split(folder / "eval.jsonl"))


@pytest.fixture()
def many_documents() -> list[Document]:
    return [Document(f"docs/{i:03d}.txt", f"text {i}") for i in range(200)]


def test_split_is_disjoint_complete_and_near_the_fraction(many_documents, tmp_path: Path) -> None:
    train, held_out = split_documents(many_documents, 0.25, tmp_path)
    train_names, eval_names = {d.name for d in train}, {d.name for d in held_out}
    assert train_names and eval_names
    assert not train_names & eval_names
    assert train_names | eval_names == {d.name for d in many_documents}
    assert 0.12 < len(held_out) / len(many_documents) < 0.38
    assert all(is_eval_document(d.name, 0.25) for d in held_out)


def test_split_is_deterministic_and_independent_of_order_and_other_documents(many_documents, tmp_path: Path) -> None:
    train, held_out = split_documents(many_documents, 0.25, tmp_path / "a")
    shuffled = many_documents[:]
    random.Random(1).shuffle(shuffled)
    train2, held_out2 = split_documents(shuffled, 0.25, tmp_path / "b")
    assert {d.name for d in train2} == {d.name for d in train}
    assert {d.name for d in held_out2} == {d.name for d in held_out}
    # a document's side does not depend on which other documents exist
    subset = many_documents[::3]
    _, held_out3 = split_documents(subset, 0.25, tmp_path / "c")
    assert {d.name for d in held_out3} == {d.name for d in held_out} & {d.name for d in subset}
    # nor on the text
    renamed = [Document(d.name, d.text + " more") for d in many_documents]
    assert {d.name for d in split_documents(renamed, 0.25, tmp_path / "d")[1]} == {d.name for d in held_out}


@pytest.mark.parametrize("fraction", [1e-12, 1 - 1e-12])
def test_split_gives_each_side_a_document_even_at_extreme_fractions(fraction, tmp_path: Path) -> None:
    documents = [Document(f"d{i}", "x" * (i + 1)) for i in range(5)]
    train, held_out = split_documents(documents, fraction, tmp_path)
    assert len(train) >= 1 and len(held_out) >= 1
    assert len(train) + len(held_out) == 5
    # the moved document is the last of train (or the first of eval); the order is kept
    assert train + held_out == documents
    assert (len(held_out), len(train)) == ((1, 4) if fraction < 0.5 else (4, 1))
    summary = write_split(iter(documents), fraction, tmp_path / "again")
    assert summary["count"] == {"train": len(train), "eval": len(held_out)}
    assert summary["characters"] == {"train": sum(len(d.text) for d in train), "eval": sum(len(d.text) for d in held_out)}
    assert not {d.name for d in train} & {d.name for d in held_out}


def test_load_files_glob_sorted_non_empty(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.md").write_text("not matched")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    corpus = files_corpus(tmp_path, include=[f"{tmp_path}/*.txt", f"{tmp_path}/**/c.txt"])
    documents = list(iter_documents(corpus))
    assert [Path(d.name).name for d in documents] == ["a.txt", "b.txt", "c.txt"]
    assert [d.text for d in documents] == ["ay", "bee", "sea"]
    assert len(list(iter_documents({**corpus, "max_documents": 2}))) == 2


def test_missing_files_name_corpus_include(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"corpus\.include"):
        list(iter_documents(files_corpus(tmp_path / "nothing-here")))
    (tmp_path / "only.txt").write_text("one document")
    with pytest.raises(UserError, match="at least 2"):
        prepare_corpus(files_corpus(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-written


def test_prepare_corpus_writes_the_split(tmp_path: Path, tiny_corpus: Path) -> None:
    out = tmp_path / "out"
    summary = prepare_corpus(files_corpus(tiny_corpus), out)
    train, held_out = list(read_split(out / "train.jsonl")), list(read_split(out / "eval.jsonl"))
    assert len(train) == summary["train_documents"] > 0 and len(held_out) == summary["eval_documents"] > 0
    assert len(train) + len(held_out) == 12
    assert not {d.name for d in train} & {d.name for d in held_out}
    assert summary["train_characters"] == sum(len(d.text) for d in train)
    assert json.loads((out / "corpus.json").read_text()) == summary
    for document in train + held_out:
        assert document.text == Path(document.name).read_text()
    # deterministic: same fingerprint and files; a changed document changes the fingerprint
    again = prepare_corpus(files_corpus(tiny_corpus), tmp_path / "again")
    assert again == summary
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in tiny_corpus.glob("*.txt"):
        (changed / path.name).write_text(path.read_text())
    (changed / "doc00.txt").write_text("different")
    assert prepare_corpus(files_corpus(changed), tmp_path / "c")["fingerprint"] != summary["fingerprint"]
    with pytest.raises(UserError, match="does not exist"):
        list(read_split(tmp_path / "absent.jsonl"))


def test_token_windows_join_documents_with_eos() -> None:
    documents = [Document("a", "aa bbb c"), Document("b", "dddd ee"), Document("c", "f")]
    # stream: 2 3 1 EOS 4 2 EOS 1 EOS
    windows = token_windows(documents, WordTokenizer(), context=3, prepend_bos=False, max_windows=10)
    assert windows.dtype == torch.long
    assert windows.tolist() == [[2, 3, 1], [99, 4, 2], [99, 1, 99]]
    windows = token_windows(documents, WordTokenizer(), context=4, prepend_bos=False, max_windows=10)
    assert windows.tolist() == [[2, 3, 1, 99], [4, 2, 99, 1]]  # the partial last window is dropped
    assert token_windows(documents, WordTokenizer(), 3, False, max_windows=2).shape == (2, 3)
    no_eos = token_windows(documents, WordTokenizer(eos=None), 3, False, 10)
    assert no_eos.tolist() == [[2, 3, 1], [4, 2, 1]]


def test_token_windows_prepend_bos() -> None:
    documents = [Document("a", "aa bbb c"), Document("b", "dddd ee")]
    # stream: 2 3 1 EOS 4 2 EOS; windows of BOS + 2 stream tokens
    windows = token_windows(documents, WordTokenizer(), context=3, prepend_bos=True, max_windows=10)
    assert windows.tolist() == [[90, 2, 3], [90, 1, 99], [90, 4, 2]]
    with pytest.raises(UserError, match=r"model\.prepend_bos"):
        token_windows(documents, WordTokenizer(bos=None), 3, True, 10)
    with pytest.raises(UserError, match="fewer than"):
        token_windows(documents, WordTokenizer(), context=50, prepend_bos=False, max_windows=10)


def test_token_windows_with_the_tiny_tokenizer(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    documents = [Document(f"d{i}", make_text(i, 20)) for i in range(3)]
    stream = []
    for document in documents:
        stream += tokenizer(document.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = token_windows(documents, tokenizer, context=16, prepend_bos=False, max_windows=10_000)
    assert windows.shape == (len(stream) // 16, 16)
    assert windows.flatten().tolist() == stream[: windows.numel()]
    assert (windows == tokenizer.eos_token_id).sum() >= 2
    assert token_windows(documents, tokenizer, 16, False, max_windows=5).shape == (5, 16)


def test_window_blocks_stream_the_same_windows_lazily() -> None:
    documents = [Document(f"d{i}", " ".join("x" * (1 + (i * 7 + j) % 5) for j in range(3 + i % 4))) for i in range(40)]
    whole = token_windows(documents, WordTokenizer(), context=5, prepend_bos=False, max_windows=1000)
    for block in (1, 3, 7, len(whole), 1000):
        blocks = list(window_blocks(documents, WordTokenizer(), 5, False, 1000, block))
        assert all(len(b) == block for b in blocks[:-1]) and 0 < len(blocks[-1]) <= block
        assert torch.equal(torch.cat(blocks), whole), block
    capped = list(window_blocks(documents, WordTokenizer(), 5, True, 10, 4))
    assert [len(b) for b in capped] == [4, 4, 2]
    assert torch.equal(torch.cat(capped), token_windows(documents, WordTokenizer(), 5, True, 10))

    pulled = []

    def reading():
        for document in documents:
            pulled.append(document.name)
            yield document

    stream = window_blocks(reading(), WordTokenizer(), 5, False, 1000, 2)
    first = next(stream)
    assert torch.equal(first, whole[:2])
    assert len(pulled) < 10  # two windows need a few documents, not the corpus
    list(window_blocks(reading(), WordTokenizer(), 5, False, 3, 2))
    assert len(pulled) < 10 + len(documents)  # the last window reached: the rest is never read
