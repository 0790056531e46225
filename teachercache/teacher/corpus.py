"""The teacher pass's input: documents from files, tokenized with the teacher's tokenizer, packed into rows.

Inputs: ``.jsonl`` / ``.json`` lines (a text field, or ``messages`` for chat data), ``.parquet``, ``.txt``
(one document per file), ``.arrow`` files and ``save_to_disk`` directories (read with pyarrow), and
``.jsonl`` / ``.json`` / ``.txt`` compressed with gzip (``.gz``) or zstandard (``.zst``); suffixes match
whatever their case. A directory is searched recursively in sorted order; its other files are listed as
ignored (``InputScan.ignored``), never dropped without a word.

``DocumentCounts`` accounts for every document (read, used, skipped by reason). A record that cannot be
used (bytes that are not UTF-8, a line that is not JSON or not an object, no text field or one that is not
a string, a lone surrogate, nesting too deep) is a bad record: skipped, counted, and handed with its file,
line and reason to ``DocumentCounts.on_bad``; more than ``--max-bad-records`` of them stop the pass
(TooManyBadRecords). A file that cannot be read at all is an error naming the file and the fix.

Rows: plain text carries a target at every position, chat data only where the next token belongs to an
assistant turn (found by rendering the teacher's chat template one message at a time). Packing
``concat`` joins documents with EOS and cuts rows of ``seq_len`` tokens; ``document`` keeps one document
per row. A row's last position never carries a target. docs/build.md ("Corpus") has the rules in full.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import zstandard

from teachercache.errors import TeachercacheError, check_number

PACKINGS = ("concat", "document")
TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".arrow")
COMPRESSIONS = (".gz", ".zst")
"""A .jsonl, .json or .txt file may come compressed with gzip or zstandard (``a.jsonl.gz``, ``b.txt.zst``)."""
COMPRESSIBLE = (".jsonl", ".json", ".txt")
DATASETS_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")
"""What ``datasets``' save_to_disk writes beside its .arrow files: metadata, not documents (in a directory)."""
MAX_NESTING = 32
"""A chat record nested deeper than this is a bad record (no conversation needs it; deeper ones crash renderers)."""
BAD_RECORDS_FLOOR = 10
"""A share given to --max-bad-records (``1%``) allows at least this many bad records."""
BAD_RECORDS_HELP = ("give a count of records (e.g. 100, or 0 for none) or a share of the documents read between 0% "
                    "and 100% (e.g. 1%)")
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(TeachercacheError):
    """An input file that cannot be used as given."""


class TooManyBadRecords(DataError):
    """More bad records than --max-bad-records allows."""


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
    max_bad_records: str = "1%"
    """Stop the build when more records than this are bad (not UTF-8, not JSON, no text field, ...): a count
    (0: none) or a share of the documents read so far (1%: at least 10 allowed). Each is listed in skipped.jsonl."""

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise DataError(f"--packing {self.packing!r}: choose one of {PACKINGS}")
        check_number("build", "seq_len (--seq-len)", self.seq_len, low=2, integer=True)
        if self.max_docs is not None:
            check_number("build", "max_docs (--max-docs)", self.max_docs, low=1, integer=True)
        bad_record_limit(self.max_bad_records)


def bad_record_limit(value) -> Callable[[int], int]:
    """--max-bad-records as a function: documents read so far -> bad records allowed. ``value`` is a count
    (``100``, ``0``) or a share of the documents read (``1%``; at least BAD_RECORDS_FLOOR)."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if math.isfinite(share) and 0 <= share <= 1:
                return lambda read: max(BAD_RECORDS_FLOOR, math.floor(share * read))
        elif not isinstance(value, (bool, float)) and int(text) >= 0:
            return lambda read, count=int(text): count
    except ValueError:
        pass
    raise DataError(f"--max-bad-records {value!r}: {BAD_RECORDS_HELP}")


@dataclass(frozen=True)
class BadRecord:
    """A record the pass could not use: where it is and why."""

    file: str
    line: int | None
    """1-based line of a .jsonl/.json file or row of a .parquet/.arrow file; None for a whole .txt file."""
    reason: str

    def __str__(self) -> str:
        return f"{self.file}{'' if self.line is None else f':{self.line}'}: {self.reason}"


@dataclass
class DocumentCounts:
    read: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Skipped documents by reason: empty, undecodable, missing field (the manifest's documents_skipped)."""
    bad: int = 0
    """Of the skipped, the bad records (every reason but empty): what --max-bad-records limits."""
    first_bad: BadRecord | None = None
    on_bad: Callable[[BadRecord], None] | None = None
    """Called with every bad record (the build prints the first ones and lists all in skipped.jsonl)."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def reject(self, kind: str, path, line: int | None, reason: str) -> None:
        """Count a bad record under ``kind`` (undecodable or missing field) and report it."""
        self.skip(kind)
        self.bad += 1
        record = BadRecord(os.fspath(path), line, reason)
        self.first_bad = self.first_bad or record
        if self.on_bad is not None:
            self.on_bad(record)


@dataclass(frozen=True)
class Document:
    source: str
    text: str | None = None
    messages: list | None = None


# ---------------------------------------------------------------------------------------------------
# Finding the input files.


def input_type(path: Path) -> tuple[str, str | None] | None:
    """(type suffix, compression suffix or None) of a file the pass reads, matched whatever the case; None
    for any other file."""
    name = path.name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            inner = Path(name[: -len(compression)]).suffix
            return (inner, compression) if inner in COMPRESSIBLE else None
    suffix = Path(name).suffix
    return (suffix, None) if suffix in TEXT_SUFFIXES else None


def _readable_types() -> str:
    return f"{', '.join(TEXT_SUFFIXES)}, or {'/'.join(COMPRESSIBLE)} compressed as {'/'.join(COMPRESSIONS)}"


@dataclass
class InputScan:
    files: list[Path]
    """The files the pass reads, in order."""
    ignored: list[tuple[Path, str]]
    """Files inside --data directories that are not read, with why."""


def scan_inputs(paths) -> InputScan:
    """The files named by ``paths``: files as given, directories searched recursively (sorted); a file in a
    directory that the pass does not read is listed in ``ignored``, a file given by name must be readable."""
    scan = InputScan([], [])
    for p in map(Path, paths):
        if p.is_dir():
            found = []
            for f in sorted(f for f in p.rglob("*") if f.is_file()):
                if f.name in DATASETS_METADATA:
                    scan.ignored.append((f, "datasets metadata"))
                elif input_type(f) is None:
                    scan.ignored.append((f, f"not a file type the build reads: {_readable_types()}"))
                else:
                    found.append(f)
            if not found:
                there = [f.name for f, _ in scan.ignored if p in f.parents]
                raise DataError(f"{p}: no file in this directory the build reads ({_readable_types()})"
                                + (f" (it has {', '.join(there[:5])}{', …' if len(there) > 5 else ''})"
                                   if there else ""))
            scan.files += found
        elif p.is_file():
            if input_type(p) is None:
                suffix = "".join(p.suffixes[-2:]) if p.suffix.lower() in COMPRESSIONS else (p.suffix or p.name)
                raise DataError(f"{p}: unknown input type {suffix!r}; use one of "
                                f"{TEXT_SUFFIXES}, or {'/'.join(COMPRESSIBLE)} compressed as {'/'.join(COMPRESSIONS)}")
            scan.files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory (--data)")
    return scan


def input_files(paths) -> list[Path]:
    """The files the pass reads (see scan_inputs)."""
    return scan_inputs(paths).files


# ---------------------------------------------------------------------------------------------------
# Reading documents.


def iter_documents(options: DataOptions, counts: DocumentCounts) -> Iterator[Document]:
    """Every document of every input file, counting what is read and skipped; TooManyBadRecords once more
    records are bad than ``options.max_bad_records`` allows."""
    allowed = bad_record_limit(options.max_bad_records)
    for path in input_files(options.paths):
        kind, compression = input_type(path)
        reader = {".jsonl": _jsonl, ".json": _jsonl, ".parquet": _parquet, ".txt": _text, ".arrow": _arrow}[kind]
        docs = reader(path, options, counts, compression)
        while True:
            if options.max_docs is not None and counts.read >= options.max_docs:
                return
            doc = next(docs, StopIteration)
            if doc is StopIteration:
                break
            counts.read += 1
            if doc is None:  # skipped; the reason is counted by the reader
                if counts.bad > allowed(counts.read):
                    raise TooManyBadRecords(
                        f"too many bad records: {counts.bad} of the {counts.read} documents read so far, more than "
                        f"--max-bad-records {options.max_bad_records} allows; the first: {counts.first_bad}. "
                        "Fix the data, or allow more with --max-bad-records (a count, or a share such as 5%)")
                continue
            if doc.messages is None and not doc.text:
                counts.skip("empty")
                continue
            yield doc


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _string_problem(value, name: str) -> str | None:
    """What makes a decoded JSON value unusable as text: nesting deeper than MAX_NESTING or a lone surrogate
    (a ``\\ud83d`` escape without its pair, which no tokenizer takes) in any string; None when it is fine."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            return f"field {name!r} is nested more than {MAX_NESTING} levels deep"
        if isinstance(item, str):
            if (m := _SURROGATE.search(item)) is not None:
                return f"a lone surrogate (\\u{ord(m.group()):04x}) in field {name!r}: not valid Unicode"
        elif isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()] + [(k, depth + 1) for k in item]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
    return None


def _messages_problem(messages, name: str) -> str | None:
    """Why a chat record's messages cannot be rendered, or None: a list of objects with a string role and a
    string (or null) content, no deeper than MAX_NESTING, without lone surrogates."""
    def usable(m) -> bool:
        return (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content", ""), (str, type(None))))

    if not isinstance(messages, list) or not all(map(usable, messages)):
        return f"field {name!r} is not a list of {{\"role\": string, \"content\": string}} objects"
    return _string_problem(messages, name)


def _record(obj, path: Path, line: int, options: DataOptions, counts: DocumentCounts, escapes: bool = True):
    """A Document from a JSON object or table row, or None (the bad record reported). ``escapes``: the record
    came from JSON text with ``\\u`` escapes that may decode to lone surrogates."""
    if not isinstance(obj, dict):
        counts.reject("undecodable", path, line, f"not a JSON object but {_json_type(obj)}")
        return None
    mf, tf = options.messages_field, options.text_field
    messages = obj.get(mf)
    if messages is not None:
        if (problem := _messages_problem(messages, mf)) is not None:
            counts.reject("undecodable", path, line, problem)
            return None
        if not messages:
            counts.skip("empty")
            return None
        return Document(f"{path}:{line}", messages=messages)
    text = obj.get(tf)
    if text is None:
        counts.reject("missing field", path, line,
                      f"no field {tf!r} (or {mf!r})" if tf not in obj else f"field {tf!r} is null")
        return None
    if not isinstance(text, str):
        counts.reject("undecodable", path, line, f"field {tf!r} is {_json_type(text)}, not a string")
        return None
    if escapes and (problem := _string_problem(text, tf)) is not None:
        counts.reject("undecodable", path, line, problem)
        return None
    return Document(f"{path}:{line}", text=text)


def _jsonl(path: Path, options: DataOptions, counts: DocumentCounts, compression: str | None = None):
    for n, line in enumerate(_lines(path, compression), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))  # a byte-order mark may open a file
        except UnicodeDecodeError as e:
            counts.reject("undecodable", path, n, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
            yield None
            continue
        except json.JSONDecodeError as e:
            counts.reject("undecodable", path, n, f"not JSON ({e.msg} at column {e.colno})")
            yield None
            continue
        except RecursionError:
            counts.reject("undecodable", path, n, "JSON nested too deeply to decode")
            yield None
            continue
        yield _record(obj, path, n, options, counts, escapes=b"\\u" in line)


def _lines(path: Path, compression: str | None) -> Iterator[bytes]:
    """The lines of a file, decompressed; DataError naming the file when it cannot be read or its compressed
    stream is damaged or cut short."""
    n = 0
    try:
        if compression == ".gz":
            with gzip.open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    yield line
        elif compression == ".zst":
            for n, line in enumerate(_split_lines(_zstd_chunks(path)), 1):
                yield line
        else:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    yield line
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
        raise DataError(f"{path}: the {compression[1:]} stream is damaged or cut short after line {n} ({e}); "
                        "recompress or replace the file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check the file and its permissions") from None


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a zstandard file of one or more frames; EOFError when the last is cut short."""
    decompressor = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        frame, fed = decompressor.decompressobj(), False
        while data := f.read(1 << 20):
            while data:
                fed = True
                yield frame.decompress(data)
                data = b""
                if frame.eof:
                    data, frame, fed = frame.unused_data, decompressor.decompressobj(), False
        if fed and not frame.eof:
            raise EOFError("the last zstandard frame ends before its end")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from (line + b"\n" for line in lines)
    if rest:
        yield rest


def _table_records(table_batches, path: Path, names: list[str], options: DataOptions, counts):
    wanted = [c for c in (options.messages_field, options.text_field) if c in names]
    if not wanted:
        raise DataError(f"{path}: no column {options.text_field!r} (or {options.messages_field!r}); it has "
                        f"{names} (choose one with --text-field)")
    n = 0
    for batch in table_batches(wanted):
        for row in batch.to_pylist():
            n += 1
            yield _record(row, path, n, options, counts, escapes=False)


def _parquet(path: Path, options: DataOptions, counts: DocumentCounts, compression: None = None):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    yield from _table_records(lambda cols: pf.iter_batches(columns=cols), path, pf.schema_arrow.names,
                              options, counts)


def _arrow(path: Path, options: DataOptions, counts: DocumentCounts, compression: None = None):
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


def _text(path: Path, options: DataOptions, counts: DocumentCounts, compression: str | None = None):
    data = b"".join(_lines(path, compression))
    try:
        yield Document(str(path), text=data.decode("utf-8"))
    except UnicodeDecodeError as e:
        counts.reject("undecodable", path, None, f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})")
        yield None


def count_documents(options: DataOptions) -> int:
    """How many documents the inputs hold (cheaply: parquet/arrow metadata, jsonl lines), for a progress
    bar with an ETA; capped at max_docs."""
    total = 0
    for path in input_files(options.paths):
        kind, compression = input_type(path)
        try:
            if kind == ".parquet":
                total += pq.ParquetFile(path).metadata.num_rows
            elif kind in (".jsonl", ".json"):
                total += sum(1 for line in _lines(path, compression) if line.strip())
            elif kind == ".arrow":
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


def tokenize(doc: Document, tokenizer, prefix: list[int] | None = None) -> tuple[list[int], list[bool]]:
    """(ids, label flags): label flag i says whether token i is a target (its predecessor predicts it).
    A text document starts with ``prefix`` (default ``start_tokens(tokenizer)``: the BOS a tokenizer adds by
    default), which is no target; a chat document is what its template renders (BOS included)."""
    if doc.messages is None:
        prefix = start_tokens(tokenizer) if prefix is None else prefix
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            return [], []
        return prefix + ids, [False] * len(prefix) + [True] * len(ids)
    return chat_tokens(doc.messages, tokenizer, doc.source)


def start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (Llama's and Gemma's BOS; none for
    GPT-2-style tokenizers). What it appends (an EOS some add) is left out: rows join documents with EOS."""
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer(probe, verbose=False)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


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
    prefix = start_tokens(tokenizer)
    for doc in iter_documents(options, counts):
        ids, labels = tokenize(doc, tokenizer, prefix)
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
