"""Shard files: one Arrow IPC stream of encoded rows each.

Shards use Arrow's IPC *stream* format (the one ``datasets.Dataset.from_file`` and every Arrow reader
open), not the IPC *file* format: a file's footer only indexes the record batches, and a reader builds
that index itself by walking the stream's message headers once, without decompressing anything.

A ShardWriter writes to a temporary name beside the final one (``NAME.partial-PID``), and only when it
is closed without an error does it flush, fsync, rename to the final name and fsync the directory. A
writer that dies leaves at most a ``.partial-`` file, which no reader opens: the manifest never names it,
and a stream cut short lacks the end-of-stream marker, so even opened by hand it is refused.

A ShardReader memory-maps a shard and reads only the columns asked for (Arrow's ``included_fields``):
a logits-only student never touches, or decompresses, the hidden-state columns.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from teachercache.errors import CacheCorruptError, CacheFormatError, CacheVersionError
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.records import decode_batch, encode_batch

ZSTD_LEVEL = 1
"""Arrow IPC buffer compression level (zstd). tools/bench_codec.py measured the trade-off on the demo
teacher's top-64 targets: level 1 stores 0.5% more than level 7 in record batches of 16k positions and
slightly less in the build's batches of 2k, and compresses about 4 times faster; 19 stores ~4% less
and writes ~20 times slower."""
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records of one finished shard."""

    file: str
    """Path relative to the cache directory, POSIX separators."""
    rows: int
    tokens: int
    target_positions: int
    target_entries: int
    bytes: int
    sha256: str


def file_kind(path: Path) -> str:
    """What a path that is not a regular file is, for error messages."""
    import stat

    mode = path.stat().st_mode
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: str | os.PathLike) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make a fully written temporary file the real one: fsync it, rename it over ``final``, fsync the
    directory. Every file of a cache is published this way."""
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(Path(final).parent)


class ShardWriter:
    """Context manager writing RowBatches into one shard file, atomically.

    >>> with ShardWriter(cache_dir / "shards/part-r000-00000.arrow", layout, relative_to=cache_dir) as w:
    ...     w.write(batch)
    >>> w.info   # ShardInfo, filled in after a clean exit
    """

    def __init__(self, path: str | os.PathLike, layout: S.Layout, *, relative_to: str | os.PathLike | None = None,
                 zstd_level: int = ZSTD_LEVEL):
        self.path = Path(path)
        self.layout = layout
        self.relative_to = Path(relative_to) if relative_to is not None else self.path.parent
        self.tmp_path = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        # use_threads=False: compress on the writing thread, not on Arrow's pool, whose threads would
        # take cores from the teacher's forward pass in a CPU build
        self._options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=zstd_level),
                                            use_threads=False)
        self._sink = self._writer = None
        self._counts = dict(rows=0, tokens=0, target_positions=0, target_entries=0)
        self.info: ShardInfo | None = None

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.tmp_path), "wb")
        self._writer = ipc.new_stream(self._sink, self.layout.schema(), options=self._options)
        return self

    @property
    def bytes_written(self) -> int:
        """Bytes in the file so far (compressed); used to cut shards by size."""
        return self._sink.tell() if self._sink is not None else 0

    def write(self, batch: RowBatch) -> None:
        self.write_record_batch(encode_batch(batch, self.layout, where=str(self.path)))

    def write_record_batch(self, record: pa.RecordBatch) -> None:
        """Write an already encoded record batch (it must have the layout's schema)."""
        self._writer.write_batch(record)
        sizes = record.column(S.TARGET_SIZES)
        self._counts["rows"] += record.num_rows
        self._counts["tokens"] += len(record.column(S.INPUT_IDS).values)
        self._counts["target_positions"] += len(sizes.values)
        self._counts["target_entries"] += int(sizes.values.to_numpy().sum(dtype=np.int64))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                self._writer.close()
            finally:
                self._sink.close()
        except Exception:  # e.g. a full disk when the end-of-stream marker is written
            self.tmp_path.unlink(missing_ok=True)
            if exc_type is None:
                raise
            return  # already leaving on an error: that one is reported, not this echo of it
        if exc_type is not None:
            self.tmp_path.unlink(missing_ok=True)
            return
        commit_file(self.tmp_path, self.path)
        self.info = ShardInfo(file=self.path.relative_to(self.relative_to).as_posix(),
                              bytes=self.path.stat().st_size, sha256=file_sha256(self.path), **self._counts)


_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class ShardReader:
    """Memory-mapped reader of one shard, for a chosen set of columns (default: all of the layout's).

    Random access by record batch: opening walks the stream's message headers once (zero-copy views of
    the mapped file); reading batch i hands Arrow's stream reader that batch's message behind the
    schema's, so only the asked-for columns are decompressed.
    """

    def __init__(self, path: str | os.PathLike, layout: S.Layout, columns: Sequence[str] | None = None):
        self.path = Path(path)
        self.layout = layout
        where = str(self.path)
        if self.path.exists() and not self.path.is_file():  # a FIFO would block the open below forever
            raise CacheCorruptError(where, f"is not a regular file ({file_kind(self.path)})",
                                    "a shard must be an Arrow IPC stream file; restore it or rebuild the cache")
        try:
            self._map = pa.memory_map(where, "r")
        except FileNotFoundError:
            raise CacheCorruptError(where, "the shard file is missing") from None
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise CacheCorruptError(where, f"not a readable Arrow IPC shard ({e})",
                                    "the shard is truncated or damaged; rebuild it") from None
        try:
            schema = self._index()
            check_schema(schema, layout, where)
            wanted = list(columns) if columns is not None else layout.columns()
            if any(c in S.TARGET_STREAMS for c in wanted):  # decoding targets needs all of these
                wanted += [c for c in decoding_columns(layout) if c not in wanted]
            missing = [c for c in wanted if c not in schema.names]
            if missing:
                raise CacheFormatError(where, f"columns {missing} are not in this shard",
                                       f"it has {schema.names}")
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            self._map.close()
            raise CacheCorruptError(where, f"not a readable Arrow IPC shard ({e})",
                                    "the shard is truncated or damaged; rebuild it") from None
        except (CacheCorruptError, CacheFormatError):
            self._map.close()
            raise
        # use_threads=False: callers parallelise by batch; for one batch the pool only adds overhead
        self._options = ipc.IpcReadOptions(use_threads=False,
                                           included_fields=sorted(schema.get_field_index(c) for c in wanted))
        self.columns = wanted

    def _index(self) -> pa.Schema:
        """Read the schema and find every record batch; returns the schema."""
        size = self._map.size()
        self._map.seek(max(0, size - len(_END_OF_STREAM)))
        if self._map.read() != _END_OF_STREAM:
            raise CacheCorruptError(self.path, "the Arrow IPC stream has no end-of-stream marker",
                                    "the shard was cut short; rebuild it")
        self._map.seek(0)
        messages = ipc.MessageReader.open_stream(self._map)
        try:
            head = messages.read_next_message()
        except StopIteration:
            head = None
        if head is None or head.type != "schema":
            what = "no message" if head is None else f"a {head.type!r} message"
            raise CacheCorruptError(self.path, f"the stream starts with {what}, not the schema",
                                    "the shard is damaged; rebuild it")
        self._schema_message = head.serialize()
        self._batches = []
        for message in messages:
            if message.type != "record batch":
                raise CacheCorruptError(self.path, f"unexpected {message.type!r} message in the stream",
                                        "a shard holds record batches only; rebuild it")
            self._batches.append(message)
        return ipc.read_schema(head)

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def read_record_batch(self, i: int) -> pa.RecordBatch:
        try:
            sink = pa.BufferOutputStream()
            sink.write(self._schema_message)
            self._batches[i].serialize_to(sink)
            record = ipc.open_stream(sink.getvalue(), options=self._options).read_next_batch()
            record.validate()
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise CacheCorruptError(self.path, f"record batch {i} does not read ({e})",
                                    "the shard is damaged; run `teachercache verify` and rebuild it") from None
        return record

    def read_batch(self, i: int) -> RowBatch:
        """Decode record batch ``i`` (only the reader's columns)."""
        return decode_batch(self.read_record_batch(i), self.layout, where=f"{self.path} (batch {i})")

    def __iter__(self) -> Iterator[RowBatch]:
        for i in range(self.num_batches):
            yield self.read_batch(i)

    def close(self) -> None:
        self._batches = None
        self._map.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decoding_columns(layout: S.Layout) -> list[str]:
    """The columns needed to decode the sparse targets."""
    return [S.INPUT_IDS, S.TARGET_MASK, S.TARGET_SIZES, S.TARGET_IDS, S.TARGET_VALUES, S.TARGET_HITS,
            S.TARGET_REFS] + (
        [S.TARGET_COUNTS] if layout.sampled else [])


def check_schema(schema: pa.Schema, layout: S.Layout, where: str) -> None:
    """Refuse a shard whose format, version or layout differs from what the manifest says."""
    meta = schema.metadata or {}
    if meta.get(S.META_FORMAT) != S.FORMAT_NAME.encode():
        raise CacheFormatError(where, "not a teachercache shard (schema metadata lacks the format name)")
    version = meta.get(S.META_VERSION, b"?").decode(errors="replace")
    if version not in [str(v) for v in S.READABLE_VERSIONS]:
        raise CacheVersionError(where, f"shard format version {version}, this reader reads "
                                f"{S.readable_versions_text()}", S.version_hint(int(version) if version.isdigit() else None))
    if version != str(layout.format_version):
        raise CacheFormatError(where, f"shard format version {version}, the manifest says {layout.format_version}",
                               "the shard does not belong to this cache; restore it or rebuild the cache")
    try:
        shard_layout = S.Layout.from_dict(json.loads(meta.get(S.META_LAYOUT, b"")), layout.format_version)
    except (ValueError, KeyError, TypeError) as e:
        raise CacheFormatError(where, f"schema metadata {S.META_LAYOUT.decode()} is unreadable ({e})") from None
    if shard_layout != layout:
        raise CacheFormatError(where, "the shard's layout differs from the manifest's",
                               f"shard {shard_layout.to_dict()}, manifest {layout.to_dict()}")
    if not schema.equals(layout.schema(), check_metadata=False):
        raise CacheFormatError(where, f"columns {schema.names} do not match the layout's {layout.columns()}")
