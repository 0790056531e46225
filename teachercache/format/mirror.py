"""A cache at a URL (s3://, gs://, hf://, ...) read through a local mirror: ``Cache.open(URL)`` makes one.

    cache = Cache.open("s3://bucket/cache", cache_dir="/scratch/shards", cache_dir_bytes=50 << 30)
    cache.prefetch([3, 0, 2, 1])            # the reading order: downloads start ahead of the reader
    with cache.open_shard(3) as reader:     # waits for shard 3 (verified), then reads it memory-mapped
        ...

Opening downloads manifest.json and the tokenizer/ files into a *view* directory (a fresh temporary one per
open, removed when the process ends), so every check that a local cache gets runs unchanged on them
(format.manifest.read_manifest, Cache.tokenizer); an error names the URL, not the view. A URL with nothing
under it, or without manifest.json, is refused as incomplete: the manifest is written last, as one object.

Shards are downloaded whole when first opened, streamed through SHA-256 into a local file
(storage.Storage.download): a damaged or truncated object is refused, naming its URL, before any byte of it
is decoded. With a plan (``Mirror.plan``: the shards in reading order) up to ``prefetch`` shards download in
worker processes ahead of the one being read (``_worker_pool``: a process has its own GIL, which a download
thread would have to win from the decoding reader at every network read), a bounded number in flight.
Downloaded shards live in a shard directory: ``cache_dir`` (persistent, shared by every cache and process that
names it: a shard's file is named by its SHA-256, so a cache rebuilt under the same URL never reads a stale copy;
the least recently used shards are deleted once they hold more than ``max_bytes``; a copy found there is hashed
again the first time a process opens it, as a local cache's shards are), or, without one, a temporary directory
that keeps only the shard being read and those being prefetched.

Reading the row count of every record batch (what student.dataset plans an epoch from) needs no download:
``batch_rows`` walks each shard's Arrow IPC message headers with small ranged reads (``stream_batch_rows``),
and keeps the result beside the shards of ``cache_dir``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct
import tempfile
import threading
import weakref
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from teachercache.errors import (CacheCorruptError, CacheError, CacheFormatError, CacheIncompleteError,
                                 CacheLimitError, CachePathError, StorageError)
from teachercache.format.cache import MAX_TOKENIZER_BYTES, MAX_TOKENIZER_FILES  # checked on the listing
from teachercache.format.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, REFERENCE_FIX, SHARDS_DIR, TOKENIZER_DIR,
                                         Manifest, read_manifest)
from teachercache.format.shards import ShardInfo, file_sha256
from teachercache.format.storage import Storage, download_file

DEFAULT_PREFETCH_SHARDS = 2
"""Shards downloaded ahead of the one being read (train --prefetch-shards)."""
DEFAULT_CACHE_DIR_BYTES = 20 << 30
"""What a --cache-dir keeps by default (train --cache-dir-gb 20)."""
_HEADER_WINDOW = 64 << 10
"""Bytes read at once while walking message headers (several small record batches' headers per read)."""
_INDEX_WORKERS = 8
"""Shards whose headers are walked at once."""


def _remove_when_gone(owner, path: Path) -> None:
    """Delete the temporary directory ``path`` when ``owner`` is collected or the process exits, in the process
    that made it only (a forked DataLoader worker leaves it to its parent)."""
    pid = os.getpid()
    weakref.finalize(owner, lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))


class Mirror:
    """The local side of a cache at a URL (see the module docstring)."""

    def __init__(self, storage: Storage, cache_dir: str | os.PathLike | None = None, max_bytes: int | None = None,
                 prefetch: int = DEFAULT_PREFETCH_SHARDS):
        if int(prefetch) < 0:
            raise ValueError(f"prefetch {prefetch}: give 0 (no prefetch) or more shards")
        self.storage, self.prefetch = storage, int(prefetch)
        self.view = Path(tempfile.mkdtemp(prefix="teachercache-view-"))
        _remove_when_gone(self, self.view)
        if cache_dir is None:
            root = Path(tempfile.mkdtemp(prefix="teachercache-shards-"))
            _remove_when_gone(self, root)
            self.max_bytes = 0
        else:
            root = Path(cache_dir)
            self.max_bytes = DEFAULT_CACHE_DIR_BYTES if max_bytes is None else int(max_bytes)
        self.cache_dir = None if cache_dir is None else root
        self.shard_dir, self.index_dir = root / "shards", root / "index"
        try:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            self.index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{root}: cannot hold downloaded shards ({e.strerror}); choose another "
                               "--cache-dir") from None
        self._reset()

    def _reset(self) -> None:
        """The per-process state: a forked worker starts its own workers and forgets its parent's downloads."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._executor: Executor | None = None
        self._futures: dict[str, Future] = {}
        self._plan: list[ShardInfo] = []
        self._cursor = 0
        self._current: str | None = None
        self._checked: set[str] = set()

    def _own(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # -- manifest and tokenizer ------------------------------------------------------------------------

    def read_manifest(self) -> Manifest:
        """Download manifest.json and tokenizer/ into the view and read the manifest with every local check;
        CacheIncompleteError when the URL holds no cache or no manifest."""
        url = self.storage.location()
        listing = self.storage.list("")
        if not listing:
            raise CacheIncompleteError(url, "nothing is stored there: no cache at this URL",
                                       "check the URL, or build a cache there with `teachercache build --out URL`")
        if MANIFEST_NAME not in listing:
            raise CacheIncompleteError(self.storage.location(MANIFEST_NAME), "missing: the cache is incomplete (its "
                                       "build did not finish)", "finish it with `teachercache build --resume`")
        (self.view / MANIFEST_NAME).write_bytes(self.storage.read_bytes(MANIFEST_NAME, MAX_MANIFEST_BYTES))
        if TOKENIZER_DIR in listing:
            self._download_tokenizer()
        try:
            return read_manifest(self.view, check_reference=self._check_reference)
        except CachePathError as e:
            raise CachePathError(self.storage.location(MANIFEST_NAME), e.problem.replace(str(self.view), url),
                                 e.fix) from None
        except CacheError as e:
            raise e.naming(str(self.view), url) from None

    def _check_reference(self, base: str, where: str) -> None:
        """A merged cache's reference at a URL (``../PART/shards/...``) must name a complete cache (one with a
        manifest) in the same bucket; its shards are checked against the manifest's SHA-256 as they stream."""
        if not self.storage.exists(f"{base}/{MANIFEST_NAME}"):  # CachePathError if it leaves the bucket
            raise CachePathError(where, f"shard path {base}/{SHARDS_DIR}/...: {self.storage.location(base)} is not a "
                                 f"complete cache (it has no {MANIFEST_NAME})", REFERENCE_FIX)

    def _download_tokenizer(self) -> None:
        where = self.storage.location(TOKENIZER_DIR)
        files = self.storage.list(TOKENIZER_DIR)
        if len(files) > MAX_TOKENIZER_FILES:
            raise CacheLimitError(where, f"{len(files)} entries is beyond the limit of {MAX_TOKENIZER_FILES}")
        if any(size is None for size in files.values()):
            raise CacheFormatError(where, "holds a directory; the tokenizer's files are regular files only",
                                   "restore the tokenizer files the build wrote or rebuild the cache")
        if sum(files.values()) > MAX_TOKENIZER_BYTES:
            raise CacheLimitError(where, f"{sum(files.values())} bytes in its files is beyond the limit of "
                                  f"{MAX_TOKENIZER_BYTES} bytes")
        for name, size in files.items():
            self.storage.download(f"{TOKENIZER_DIR}/{name}", self.view / TOKENIZER_DIR / name, size=size)

    # -- shards ---------------------------------------------------------------------------------------

    def path_of(self, info: ShardInfo) -> Path:
        """Where the local copy of a shard lies (or will): named by its SHA-256."""
        return self.shard_dir / f"{info.sha256}.arrow"

    def fetch(self, info: ShardInfo, verify: bool = True) -> Path:
        """The local copy of shard ``info``: downloaded (and verified while streaming) unless it is there or
        being prefetched; a copy found in the shard directory is hashed again first when ``verify`` (once per
        process). Then the next shards of the plan start downloading."""
        self._own()
        with self._lock:
            future = self._futures.pop(info.sha256, None)
            self._current = info.sha256  # pinned from here: a prefetch that ends now must not evict it
        fresh = self._prefetched(info, future) if future is not None else self._ensure(info)
        path = self.path_of(info)
        if verify and not fresh and info.sha256 not in self._checked and not _holds(path, info.sha256):
            path.unlink(missing_ok=True)  # a damaged local copy: the object itself was verified when it came
            self._ensure(info)
        self._checked.add(info.sha256)
        self._schedule_after(info)
        return path

    def _prefetched(self, info: ShardInfo, future: Future) -> bool:
        """Wait for a prefetch worker's download of ``info`` (verified as it streamed); True. A worker that died
        (killed, out of memory) leaves the download to this process."""
        try:
            future.result()
        except BrokenExecutor:
            _POOL.clear()  # the next prefetch starts new workers
            return self._ensure(info)
        except OSError as e:
            raise self._local_copy_error(info, e) from None
        return self._downloaded(info)

    def _local_copy_error(self, info: ShardInfo, e: OSError) -> StorageError:
        return StorageError(f"{self.shard_dir}: cannot write the local copy of {self.storage.location(info.file)} "
                            f"({e.strerror or e}); free space there or choose another --cache-dir")

    def _downloaded(self, info: ShardInfo) -> bool:
        """A fresh, verified local copy of ``info``: checked, and the directory kept within its budget; True."""
        self._checked.add(info.sha256)
        self._evict(keep=info.sha256)
        return True

    def _pool(self) -> Executor:
        """The prefetch workers: for a remote storage the process's pool of worker processes (``_worker_pool``),
        threads of this mirror's own for a local one."""
        if not self.storage.remote:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.prefetch, thread_name_prefix="teachercache-prefetch")
                weakref.finalize(self, self._executor.shutdown, wait=False)
            return self._executor
        return _worker_pool(self.prefetch)

    def _ensure(self, info: ShardInfo) -> bool:
        """Download shard ``info`` unless a copy of the right size is there; True when it was downloaded."""
        path = self.path_of(info)
        try:
            if path.is_file() and path.stat().st_size == info.bytes:
                os.utime(path)  # most recently used
                return False
            self.storage.download(info.file, path, size=info.bytes, sha256=info.sha256)
        except OSError as e:
            raise self._local_copy_error(info, e) from None
        return self._downloaded(info)

    def plan(self, shards: Sequence[ShardInfo]) -> None:
        """The shards in the order they will be read; the first ``prefetch`` start downloading now."""
        self._own()
        self._plan, self._cursor = list(shards), 0
        wanted = {s.sha256 for s in self._plan[:self.prefetch]}
        with self._lock:  # downloads of an earlier plan that this one does not start with are no longer waited for
            self._futures = {sha: f for sha, f in self._futures.items() if sha in wanted}
        self._submit(self._plan[:self.prefetch])

    def _schedule_after(self, info: ShardInfo) -> None:
        if not self.prefetch or not self._plan:
            return
        shas = [s.sha256 for s in self._plan]
        try:
            k = shas.index(info.sha256, self._cursor)
        except ValueError:
            return  # read outside the plan: nothing to prefetch
        self._cursor = k + 1
        self._submit(self._plan[k + 1:k + 1 + self.prefetch])

    def _submit(self, shards: Sequence[ShardInfo]) -> None:
        """Start downloading these shards in the background, at most ``prefetch`` in flight."""
        if not self.prefetch:
            return
        with self._lock:
            for info in shards:
                if len(self._futures) >= self.prefetch:
                    break
                path = self.path_of(info)
                if info.sha256 in self._futures or (path.is_file() and path.stat().st_size == info.bytes):
                    continue
                self._futures[info.sha256] = self._pool().submit(download_file, self.storage, info.file, str(path),
                                                                 info.bytes, info.sha256)

    def _evict(self, keep: str) -> None:
        """Delete the least recently used shard copies while the directory holds more than ``max_bytes``; never
        the one being read, one being prefetched, nor ``keep``."""
        with self._lock:
            pinned = set(self._futures) | {self._current, keep}
        files = []
        for p in self.shard_dir.glob("*.arrow"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p.stem not in pinned:
                p.unlink(missing_ok=True)  # a process reading it keeps its memory map
                total -= size

    # -- record batches -------------------------------------------------------------------------------

    def batch_rows(self, shards: Sequence[ShardInfo]) -> list[np.ndarray]:
        """Rows of every record batch, per shard, from the shards' message headers (``stream_batch_rows``):
        a local copy when there is one, else small ranged reads of the object; kept in ``index/`` of a
        cache_dir."""
        with ThreadPoolExecutor(_INDEX_WORKERS) as pool:
            return list(pool.map(self._batch_rows, shards))

    def _batch_rows(self, info: ShardInfo) -> np.ndarray:
        index = self.index_dir / f"{info.sha256}.json"
        if self.cache_dir is not None and index.is_file():
            try:
                return np.array(json.loads(index.read_text()), np.int64)
            except (OSError, ValueError):
                pass  # rebuilt below
        path = self.path_of(info)
        if path.is_file() and path.stat().st_size == info.bytes:
            def read(start, end, path=path):
                with open(path, "rb") as f:
                    f.seek(start)
                    return f.read(end - start)
        else:
            def read(start, end):
                return self.storage.read_range(info.file, start, end)
        rows = stream_batch_rows(read, info.bytes, self.storage.location(info.file))
        if self.cache_dir is not None:
            tmp = index.with_name(f"{index.name}.partial-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps(rows.tolist()))
            os.replace(tmp, index)
        return rows


def _holds(path: Path, sha256: str) -> bool:
    """Whether the local copy ``path`` is still there with the SHA-256 ``sha256`` (another process may have
    evicted it meanwhile)."""
    try:
        return file_sha256(path) == sha256
    except FileNotFoundError:
        return False


_POOL: dict[int, tuple[int, ProcessPoolExecutor]] = {}
"""This process's prefetch workers, (how many, the pool), by pid: a forked DataLoader worker starts its own."""


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that download shards, each with its own GIL: a download thread beside a decoding reader
    waits for the GIL at every network read (7 to 70 MB/s here, where one alone reads 300 MB/s). Started with
    ``spawn`` (a fork of a process running fsspec's event loop thread would inherit it half-copied) once per
    process, grown when a mirror asks for more; each mirror keeps at most its ``prefetch`` downloads in flight."""
    size, pool = _POOL.get(os.getpid(), (0, None))
    if pool is None or size < workers:
        if pool is not None:
            pool.shutdown(wait=False)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        _POOL.clear()
        _POOL[os.getpid()] = (workers, pool)
    return pool


# ---------------------------------------------------------------------------------------------------------
# Arrow IPC stream message headers (https://arrow.apache.org/docs/format/Columnar.html#encapsulated-message-format):
# each message is 0xFFFFFFFF, an int32 metadata length, a flatbuffer Message (its header a Schema or a RecordBatch,
# and bodyLength), then bodyLength bytes of body; 0xFFFFFFFF 0x00000000 ends the stream.

_SCHEMA, _RECORD_BATCH = 1, 3
"""MessageHeader union types (Message.fbs)."""


def stream_batch_rows(read: Callable[[int, int], bytes], size: int, where: str) -> np.ndarray:
    """(num_batches,) int64: the rows of each record batch of the Arrow IPC stream of ``size`` bytes that
    ``read(start, end)`` reads, from the message headers alone (no body is read); CacheCorruptError naming
    ``where`` when the stream is not one. tests/teachercache/format/test_mirror.py checks it against pyarrow's
    own reader on real shards."""
    window, window_start = b"", 0

    def at(start: int, n: int) -> bytes:
        nonlocal window, window_start
        if start < window_start or start + n > window_start + len(window):
            window_start, window = start, read(start, min(size, start + max(n, _HEADER_WINDOW)))
        chunk = window[start - window_start:start - window_start + n]
        if len(chunk) != n:
            raise CacheCorruptError(where, f"the Arrow IPC stream ends inside a message header at byte {start}",
                                    "the shard was cut short; rebuild it")
        return chunk

    rows, offset = [], 0
    while True:
        continuation, length = struct.unpack("<Ii", at(offset, 8))
        if continuation != 0xFFFFFFFF or length < 0:
            raise CacheCorruptError(where, f"not an Arrow IPC stream (no message at byte {offset})",
                                    "the shard is damaged; rebuild it")
        if length == 0:
            return np.array(rows, np.int64)
        kind, body, count = _message_summary(at(offset + 8, length), where, offset)
        if (offset == 0) != (kind == _SCHEMA) or kind not in (_SCHEMA, _RECORD_BATCH):
            raise CacheCorruptError(where, f"unexpected message (type {kind}) at byte {offset}",
                                    "a shard is a schema, then record batches; rebuild it")
        if kind == _RECORD_BATCH:
            rows.append(count)
        offset += 8 + length + body
        if offset + 8 > size:
            raise CacheCorruptError(where, "the Arrow IPC stream has no end-of-stream marker",
                                    "the shard was cut short; rebuild it")


def _message_summary(meta: bytes, where: str, offset: int) -> tuple[int, int, int]:
    """(header type, body length, record batch rows or 0) of a flatbuffer Message."""
    try:
        def field(table: int, slot: int) -> int:
            """The position of a table's field ``slot`` (0 when absent: the field has its default)."""
            vtable = table - struct.unpack_from("<i", meta, table)[0]
            vsize = struct.unpack_from("<H", meta, vtable)[0]
            at = 4 + 2 * slot
            return table + struct.unpack_from("<H", meta, vtable + at)[0] if at < vsize and \
                struct.unpack_from("<H", meta, vtable + at)[0] else 0

        message = struct.unpack_from("<I", meta, 0)[0]
        kind_at, header_at, body_at = field(message, 1), field(message, 2), field(message, 3)
        kind = meta[kind_at] if kind_at else 0
        body = struct.unpack_from("<q", meta, body_at)[0] if body_at else 0
        rows = 0
        if kind == _RECORD_BATCH and header_at:
            header = header_at + struct.unpack_from("<I", meta, header_at)[0]
            length_at = field(header, 0)
            rows = struct.unpack_from("<q", meta, length_at)[0] if length_at else 0
    except (struct.error, IndexError):
        raise CacheCorruptError(where, f"the message header at byte {offset} does not parse",
                                "the shard is damaged; rebuild it") from None
    if body < 0 or rows < 0:
        raise CacheCorruptError(where, f"the message header at byte {offset} declares a negative size",
                                "the shard is damaged; rebuild it")
    return kind, body, rows
