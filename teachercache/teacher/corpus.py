"""The teacher pass's input: documents from files, tokenized with the teacher's tokenizer, packed into rows.

Inputs: ``.jsonl`` / ``.json`` lines (a text field, or ``messages`` for chat data), ``.parquet``, ``.txt``
(one document per file), ``.arrow`` files and ``save_to_disk`` directories (read with pyarrow); a
directory is searched recursively in sorted order. ``DocumentCounts`` accounts for every document (read,
used, skipped by reason); a file that cannot be read is an error naming the file and the fix.

Rows: plain text carries a target at every position, chat data only where the next token belongs to an
assistant turn (found by rendering the teacher's chat template one message at a time). Packing
``concat`` joins documents with EOS and cuts rows of ``seq_len`` tokens; ``document`` keeps one document
per row. A row's last position never carries a target. docs/build.md ("Corpus") has the rules in full.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from teachercache.errors import TeachercacheError

PACKINGS = ("concat", "document")
TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".arrow")


class DataError(TeachercacheError):
    """An input file that cannot be used as given."""


@dataclass(frozen=True)
class DataOptions:
    """Where the documents come from and how they become rows."""

    paths: tuple[str, ...]
    """Input files or directories."""
    seq_len: int = 2048
    """Tokens per row."""
    packing: str = "concat"
    """concat: documents joined with EOS and cut into rows; document: one document per row."""
    text_field: str = "text"
    """Field (or column) holding a document's text."""
    messages_field: str = "messages"
    """Field holding a chat conversation (list of {role, content}); used when present."""
    max_docs: int | None = None
    """Stop after reading this many documents."""

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise DataError(f"--packing {self.packing!r}: choose one of {PACKINGS}")
        if self.seq_len < 2:
            raise DataError(f"--seq-len {self.seq_len}: a row needs at least 2 tokens")


@dataclass
class DocumentCounts:
    read: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


@dataclass(frozen=True)
class Document:
    source: str
    text: str | None = None
    messages: list | None = None


# ---------------------------------------------------------------------------------------------------
# Reading documents.


def input_files(paths) -> list[Path]:
    """The files named by ``paths``: files as given, directories searched recursively (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"{p}: no {'/'.join(TEXT_SUFFIXES)} files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory (--data)")
    return files


def iter_documents(options: DataOptions, counts: DocumentCounts) -> Iterator[Document]:
    """Every document of every input file, counting what is read and skipped."""
    for path in input_files(options.paths):
        reader = {".jsonl": _jsonl, ".json": _jsonl, ".parquet": _parquet, ".txt": _text,
                  ".arrow": _arrow}.get(path.suffix)
        if reader is None:
            raise DataError(f"{path}: unknown input type {path.suffix!r}; use one of {TEXT_SUFFIXES}")
        docs = reader(path, options, counts)
        while True:
            if options.max_docs is not None and counts.read >= options.max_docs:
                return
            doc = next(docs, StopIteration)
            if doc is StopIteration:
                break
            counts.read += 1
            if doc is None:
                continue  # skipped; the reason is counted by the reader
            if doc.messages is None and not doc.text:
                counts.skip("empty")
                continue
            yield doc


def _record(obj, source: str, options: DataOptions, counts: DocumentCounts):
    """A Document from a JSON object or table row, or None (skip counted)."""
    if not isinstance(obj, dict):
        counts.skip("undecodable")
        return None
    messages = obj.get(options.messages_field)
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            counts.skip("undecodable")
            return None
        if not messages:
            counts.skip("empty")
            return None
        return Document(source, messages=messages)
    text = obj.get(options.text_field)
    if text is None:
        counts.skip("missing field")
        return None
    if not isinstance(text, str):
        counts.skip("undecodable")
        return None
    return Document(source, text=text)


def _jsonl(path: Path, options: DataOptions, counts: DocumentCounts):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                counts.skip("undecodable")
                yield None
                continue
            yield _record(obj, f"{path}:{n}", options, counts)


def _table_records(table_batches, path: Path, names: list[str], options: DataOptions, counts):
    wanted = [c for c in (options.messages_field, options.text_field) if c in names]
    if not wanted:
        raise DataError(f"{path}: no column {options.text_field!r} (or {options.messages_field!r}); it has "
                        f"{names} (choose one with --text-field)")
    n = 0
    for batch in table_batches(wanted):
        for row in batch.to_pylist():
            n += 1
            yield _record(row, f"{path}:{n}", options, counts)


def _parquet(path: Path, options: DataOptions, counts: DocumentCounts):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    yield from _table_records(lambda cols: pf.iter_batches(columns=cols), path, pf.schema_arrow.names,
                              options, counts)


def _arrow(path: Path, options: DataOptions, counts: DocumentCounts):
    """An Arrow IPC file or stream (what datasets' save_to_disk writes as data-*.arrow)."""
    try:
        source = pa.memory_map(str(path))
        try:
            reader = ipc.open_file(source)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except pa.ArrowInvalid:
            source.seek(0)
            batches = list(ipc.open_stream(source))
        schema = batches[0].schema if batches else pa.schema([])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None
    yield from _table_records(lambda cols: (b.select(cols) for b in batches), path, schema.names,
                              options, counts)


def _text(path: Path, options: DataOptions, counts: DocumentCounts):
    try:
        yield Document(str(path), text=path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        counts.skip("undecodable")
        yield None


def count_documents(options: DataOptions) -> int:
    """How many documents the inputs hold (cheaply: parquet/arrow metadata, jsonl lines), for a progress
    bar with an ETA; capped at max_docs."""
    total = 0
    for path in input_files(options.paths):
        try:
            if path.suffix == ".parquet":
                total += pq.ParquetFile(path).metadata.num_rows
            elif path.suffix in (".jsonl", ".json"):
                with open(path, "rb") as f:
                    total += sum(1 for line in f if line.strip())
            elif path.suffix == ".arrow":
                total += sum(1 for _ in _arrow(path, options, DocumentCounts()))
            else:
                total += 1
        except (DataError, pa.ArrowException, OSError):
            pass  # the pass itself reports the file properly
        if options.max_docs is not None and total >= options.max_docs:
            return options.max_docs
    return total


# ---------------------------------------------------------------------------------------------------
# Tokenizing and packing.


@dataclass
class PackedRow:
    """One training sequence: its tokens and which positions carry a target."""

    input_ids: np.ndarray    # (T,) int32
    target_mask: np.ndarray  # (T,) bool; the last position is always False


def tokenize(doc: Document, tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, label flags): label flag i says whether token i is a target (its predecessor predicts it)."""
    if doc.messages is None:
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        return ids, [True] * len(ids)
    return chat_tokens(doc.messages, tokenizer, doc.source)


def chat_tokens(messages: list[dict], tokenizer, source: str = "<chat>") -> tuple[list[int], list[bool]]:
    """Render a conversation with the tokenizer's chat template; the tokens of assistant messages are the
    labels. The header the template puts before an assistant message (its generation prompt) is not."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: chat data, but the teacher tokenizer has no chat_template")

    def render(msgs, prompt=False):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt,
                                            return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    ids: list[int] = []
    labels: list[bool] = []
    for i, message in enumerate(messages):
        assistant = message.get("role") == "assistant"
        head = render(messages[:i], prompt=True) if (assistant and i > 0) else ids
        whole = render(messages[: i + 1])
        if head[: len(ids)] != ids or whole[: len(head)] != head:
            raise DataError(f"{source}: the chat template does not render a conversation's prefix as a "
                            "prefix of the whole, so assistant tokens cannot be told apart")
        labels += [False] * (len(head) - len(ids)) + [assistant] * (len(whole) - len(head))
        ids = whole
    return ids, labels


def iter_packed_rows(options: DataOptions, tokenizer, counts: DocumentCounts) -> Iterator[PackedRow]:
    """Rows of packed token ids with their target masks (see the module docstring)."""
    eos = tokenizer.eos_token_id
    if options.packing == "concat" and eos is None:
        raise DataError("--packing concat joins documents with EOS, but the tokenizer has no eos_token "
                        "(use --packing document)")
    ids_buf: list[int] = []
    lab_buf: list[bool] = []
    for doc in iter_documents(options, counts):
        ids, labels = tokenize(doc, tokenizer)
        if not ids:
            counts.skip("empty")
            continue
        counts.used += 1
        if options.packing == "concat":
            ids_buf += ids + [eos]
            lab_buf += labels + [doc.messages is None]
            while len(ids_buf) >= options.seq_len:
                yield _row(ids_buf[: options.seq_len], lab_buf[: options.seq_len])
                del ids_buf[: options.seq_len], lab_buf[: options.seq_len]
        else:
            for start in range(0, len(ids), options.seq_len):
                yield _row(ids[start:start + options.seq_len], labels[start:start + options.seq_len])
    if ids_buf:
        yield _row(ids_buf, lab_buf)


def _row(ids: list[int], labels: list[bool]) -> PackedRow:
    mask = np.zeros(len(ids), bool)
    mask[:-1] = labels[1:]  # position t predicts token t+1
    return PackedRow(np.asarray(ids, np.int32), mask)


def data_fingerprint(options: DataOptions) -> str:
    """Hash of the input files' names, sizes and modification times, and the options that shape rows."""
    import hashlib

    h = hashlib.sha256()
    for f in input_files(options.paths):
        st = f.stat()
        h.update(f"{os.fspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([options.seq_len, options.packing, options.text_field, options.messages_field,
                         options.max_docs]).encode())
    return h.hexdigest()
