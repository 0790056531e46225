"""A cache directory as a whole: open one to read (manifest + shards), or write one shard by shard.

>>> cache = Cache.open("CACHE")                      # reads and checks manifest.json
>>> for batch in cache.iter_batches(columns=[...]):  # RowBatch per Arrow record batch, shard by shard
...     ...

Reading checks each shard's SHA-256 against the manifest the first time the shard is opened (one
sequential read of the file; ``verify_checksums=False`` skips it), so a damaged shard is an error naming
the file rather than wrong numbers. ``Cache.tokenizer()`` opens the cache's copy of the teacher's tokenizer
the same way: its files checked first (no links, bounded sizes and JSON), the loaded tokenizer compared with
the manifest's fingerprint.

A cache may live at an fsspec URL (s3://, gs://, hf://, ...): ``Cache.open(URL)`` reads it through a local
mirror (format.mirror: the manifest and tokenizer downloaded on open, each shard streamed down through its
SHA-256 when first opened, ``prefetch`` shards ahead of the reader, an optional LRU ``cache_dir``), and
``CacheWriter(publish=...)`` hands each finished file to the remote build (teacher.remote_build), which uploads
it. A local path is read and written exactly as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Sequence

from teachercache.errors import (CacheCorruptError, CacheError, CacheFormatError, CacheLimitError, CachePathError,
                                  TokenizerLoadError)
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.manifest import (MANIFEST_NAME, SHARDS_DIR, TOKENIZER_DIR, DataInfo, Manifest, TargetSpec,
                                          TeacherInfo, TokenizerInfo, Totals, read_json_file, read_manifest,
                                          resolve_in_cache, shard_file_name, tokenizer_fingerprint, write_manifest)
from teachercache.format.shards import ZSTD_LEVEL, ShardInfo, ShardReader, ShardWriter, file_kind, file_sha256
from teachercache.format.storage import is_url, open_storage

DEFAULT_SHARD_BYTES = 512 << 20
"""A new shard is started once the current one holds this many (compressed) bytes."""
MAX_TOKENIZER_FILES = 64
"""Entries of CACHE/tokenizer/ (save_pretrained writes 2 to 6)."""
MAX_TOKENIZER_BYTES = 1 << 29
"""The files of CACHE/tokenizer/ together, and so each JSON file parsed (the largest tokenizer.json of a
released model is about 35 MB)."""


class Cache:
    """A complete cache opened for reading. ``path`` is its directory; for a cache at a URL, the local view
    that holds its manifest and tokenizer (``mirror`` then fetches the shards, ``location`` is the URL)."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest, verify_checksums: bool = True, mirror=None):
        self.path = Path(path)
        self.manifest = manifest
        self.layout = manifest.layout
        self.verify_checksums = verify_checksums
        self._verified: set[int] = set()
        self.mirror = mirror
        """format.mirror.Mirror of a cache at a URL, else None."""
        self.location = mirror.storage.location() if mirror is not None else str(path)
        """The cache as the user named it: its URL or its path."""

    @classmethod
    def open(cls, path: str | os.PathLike, verify_checksums: bool = True, *, cache_dir: str | os.PathLike | None = None,
             cache_dir_bytes: int | None = None, prefetch_shards: int | None = None,
             storage_options: dict | None = None) -> "Cache":
        """Open the cache at ``path``: a directory, or an fsspec URL. For a URL only: ``cache_dir`` keeps the
        downloaded shards (LRU, at most ``cache_dir_bytes``; none: a temporary directory keeps only those in
        use), ``prefetch_shards`` downloads ahead of the reader (default format.mirror.DEFAULT_PREFETCH_SHARDS),
        ``storage_options`` go to fsspec (format.storage has the credentials and endpoints)."""
        if not is_url(path):
            return cls(path, read_manifest(path), verify_checksums)
        from teachercache.format.mirror import DEFAULT_PREFETCH_SHARDS, Mirror

        mirror = Mirror(open_storage(path, storage_options), cache_dir, cache_dir_bytes,
                        DEFAULT_PREFETCH_SHARDS if prefetch_shards is None else prefetch_shards)
        manifest = mirror.read_manifest()
        return cls(mirror.view, manifest, verify_checksums, mirror)

    def shard_location(self, i: int) -> str:
        """Shard ``i`` as a message names it: its URL, or its path in the cache directory."""
        if self.mirror is not None:
            return self.mirror.storage.location(self.shards[i].file)
        return str(self.path / self.shards[i].file)

    def prefetch(self, order: Sequence[int]) -> None:
        """The shards (indices) in the order they will be read: a cache at a URL starts downloading the first
        ones now and keeps ``prefetch_shards`` ahead of the reader. Nothing for a local cache."""
        if self.mirror is not None:
            self.mirror.plan([self.shards[i] for i in order])

    def _fetched(self, i: int) -> Path:
        """The local copy of shard ``i`` of a cache at a URL (verified while it was downloaded)."""
        path = self.mirror.fetch(self.shards[i], verify=self.verify_checksums and i not in self._verified)
        if self.verify_checksums:
            self._verified.add(i)
        return path

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    def shard_path(self, i: int) -> Path:
        return resolve_in_cache(self.path, self.shards[i].file)

    def regular_shard_path(self, i: int) -> Path:
        """shard_path(i), refused (naming the file as the manifest lists it) unless it is a regular file."""
        if self.mirror is not None:
            return self._fetched(i)
        path, listed = self.shard_path(i), self.path / self.shards[i].file
        if not path.exists():
            raise CacheCorruptError(listed, "the shard file is missing",
                                    "the manifest lists it; rebuild the cache or restore the file")
        if not path.is_file():
            raise CacheCorruptError(listed, f"is not a regular file ({file_kind(path)})",
                                    "the manifest lists it as a shard; restore the file or rebuild the cache")
        return path

    def check_shard(self, i: int) -> None:
        """Compare shard ``i``'s size and SHA-256 with the manifest; CacheCorruptError if they differ."""
        if self.mirror is not None:  # while it streams down (or, a copy kept in cache_dir, hashed again)
            self.mirror.fetch(self.shards[i], verify=True)
            return
        info, path = self.shards[i], self.regular_shard_path(i)
        size = path.stat().st_size
        if size != info.bytes:
            raise CacheCorruptError(path, f"size {size} bytes, the manifest says {info.bytes} (truncated?)")
        if file_sha256(path) != info.sha256:
            raise CacheCorruptError(path, "SHA-256 differs from the manifest: the file is damaged",
                                    "rebuild the cache or restore the file")

    def open_shard(self, i: int, columns: Sequence[str] | None = None) -> ShardReader:
        if self.mirror is not None:
            return ShardReader(self._fetched(i), self.layout, columns)
        if self.verify_checksums and i not in self._verified:
            self.check_shard(i)
            self._verified.add(i)
        return ShardReader(self.regular_shard_path(i), self.layout, columns)

    def iter_batches(self, columns: Sequence[str] | None = None,
                     shards: Sequence[int] | None = None) -> Iterator[RowBatch]:
        order = range(len(self.shards)) if shards is None else shards
        self.prefetch(order)
        for i in order:
            with self.open_shard(i, columns) as reader:
                yield from reader

    def tokenizer(self):
        """The cache's copy of the teacher's tokenizer: its files checked (``check_tokenizer_files``), loaded by
        transformers without running code, then compared with the manifest (``check_tokenizer``). A cache at a
        URL: its files were downloaded on open, and errors name the URL."""
        if self.mirror is not None:
            try:
                return self._tokenizer()
            except CacheError as e:
                raise e.naming(str(self.path), self.location) from None
        return self._tokenizer()

    def _tokenizer(self):
        directory = check_tokenizer_files(self.path)
        try:
            tokenizer = load_tokenizer_without_code(directory, local_files_only=True)
        except TokenizerLoadError as e:
            raise CacheFormatError(directory, e.problem, _NO_CODE_FIX if e.custom_code else _TOKENIZER_FIX) from None
        check_tokenizer(self.manifest, tokenizer, directory)
        return tokenizer


def is_cache(location: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """Whether ``location`` (a directory or a URL) holds a manifest.json: a complete cache, not a text file."""
    if is_url(location):
        return open_storage(location, storage_options).exists(MANIFEST_NAME)
    return (Path(location) / MANIFEST_NAME).is_file()


_TOKENIZER_FIX = ("restore the tokenizer files the build wrote (save_pretrained of the teacher's tokenizer) or "
                  "rebuild the cache")
_NO_CODE_FIX = ("opening a cache never runs code: give it a standard tokenizer, tokenizer.json and a "
                "tokenizer_config.json without auto_map, as save_pretrained of a built-in tokenizer class writes them")


def load_tokenizer_without_code(path: str | os.PathLike, **kwargs):
    """``AutoTokenizer.from_pretrained(path, trust_remote_code=False)``: never imports code the files name and
    never asks about it on stdin. TokenizerLoadError (the problem, and whether the files name custom code)
    when transformers refuses or fails; callers add the fix that fits their flag."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    except Exception as e:  # transformers and tokenizers raise OSError, ValueError, KeyError, Rust's Exception
        code = custom_tokenizer_code(path)
        if code:
            raise TokenizerLoadError(f"{code}, which teachercache never runs", custom_code=True) from None
        raise TokenizerLoadError(f"transformers cannot load the tokenizer ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:300]})", custom_code=False) from None


def custom_tokenizer_code(path: str | os.PathLike) -> str | None:
    """'FILE names custom tokenizer code (field auto_map: [...])' when the tokenizer files in ``path`` point
    transformers at code of their own (a .py file it would import), else None."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            auto_map = json.loads((Path(path) / name).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        code = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map   # [slow, fast] class names
        if code:
            return f"{name} names custom tokenizer code (field auto_map: {json.dumps(code)})"
    return None


def check_tokenizer(manifest: Manifest, tokenizer, where: str | os.PathLike) -> None:
    """Refuse a tokenizer that is not the one the cache was built with: its length must be the manifest's
    tokenizer.vocab_size and its fingerprint (``tokenizer_fingerprint``) tokenizer.fingerprint."""
    want = manifest.tokenizer
    if len(tokenizer) != want.vocab_size:
        raise CacheCorruptError(where, f"the tokenizer holds {len(tokenizer)} tokens, the manifest's "
                                f"tokenizer.vocab_size is {want.vocab_size}", _TOKENIZER_FIX)
    got = tokenizer_fingerprint(tokenizer)
    if got != want.fingerprint:
        raise CacheCorruptError(where, f"the tokenizer's fingerprint {got[:16]} differs from the manifest's "
                                f"tokenizer.fingerprint {want.fingerprint[:16]}: its files were replaced or damaged",
                                _TOKENIZER_FIX)


def check_tokenizer_files(cache_dir: str | os.PathLike) -> Path:
    """CACHE/tokenizer/, checked before any of its files is handed to transformers; returns its path. Refused
    (a CacheError naming the path): a missing directory, a symbolic link (the directory itself included),
    anything but regular files, more than MAX_TOKENIZER_FILES entries or MAX_TOKENIZER_BYTES bytes, and a .json
    file that is not JSON nested at most MAX_JSON_DEPTH levels (transformers parses them with Python's json)."""
    directory = Path(cache_dir) / TOKENIZER_DIR
    refuse_links(cache_dir, TOKENIZER_DIR)
    if not directory.is_dir():
        raise CacheFormatError(directory, "the cache has no tokenizer directory",
                               "copy the teacher's tokenizer files into it (save_pretrained)")
    try:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        if len(entries) > MAX_TOKENIZER_FILES:
            raise CacheLimitError(directory, f"{len(entries)} entries is beyond the limit of {MAX_TOKENIZER_FILES}",
                                  _TOKENIZER_FIX)
        total = 0
        for entry in entries:
            if entry.is_symlink():
                refuse_links(cache_dir, f"{TOKENIZER_DIR}/{entry.name}")
            if not entry.is_file(follow_symlinks=False):
                raise CacheFormatError(entry.path, f"is not a regular file ({file_kind(Path(entry.path))})",
                                       _TOKENIZER_FIX)
            total += entry.stat(follow_symlinks=False).st_size
    except OSError as e:
        raise CacheFormatError(e.filename or directory, f"cannot be read ({e.strerror})", _TOKENIZER_FIX) from None
    if total > MAX_TOKENIZER_BYTES:
        raise CacheLimitError(directory, f"{total} bytes in its files is beyond the limit of {MAX_TOKENIZER_BYTES} "
                              "bytes", _TOKENIZER_FIX)
    for entry in entries:
        if entry.name.endswith(".json"):
            read_json_file(entry.path, MAX_TOKENIZER_BYTES)
    return directory


def refuse_links(cache_dir: str | os.PathLike, relative: str) -> None:
    """CachePathError naming the first symbolic link on the way from the cache directory to ``relative`` (the
    cache directory itself may be one: it is the path the user gave). Reading follows links that stay inside
    the cache; ``verify`` and the tokenizer reader accept none."""
    path = Path(cache_dir)
    for part in PurePosixPath(relative).parts:
        path = path / part
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise CachePathError(path, f"is a symbolic link (to {target[:200]!r}); a cache's files are read only "
                                 "from inside it, never through a link", "replace the link with the file it names")


class CacheWriter:
    """Writes RowBatches into size-capped shards of one rank, then (``finish``) the manifest.

    Shards are named shards/part-r{rank}-{index}.arrow. Only rank 0 of a multi-rank build calls
    ``finish`` with every rank's ShardInfos; the build issue's torchrun path does that after a barrier.
    Each ``write`` becomes one Arrow record batch, the unit of compression and of decoding: give it
    thousands of target positions (references to earlier positions only hit where contexts repeat).
    ``publish``, when given, is called with the relative path of each file once it is complete (a closed shard,
    then the manifest): a build into a URL writes into a local staging directory and uploads from there.
    """

    def __init__(self, path: str | os.PathLike, layout: S.Layout, *, rank: int = 0,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, first_index: int = 0, zstd_level: int = ZSTD_LEVEL,
                 publish: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.publish = publish
        self.layout = layout
        self.rank = rank
        self.shard_bytes = shard_bytes
        self.zstd_level = zstd_level
        self.next_index = first_index
        self.shards: list[ShardInfo] = []
        self._current: ShardWriter | None = None
        (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)

    def write(self, batch: RowBatch) -> None:
        if self._current is None:
            file = self.path / shard_file_name(self.rank, self.next_index)
            self._current = ShardWriter(file, self.layout, relative_to=self.path,
                                        zstd_level=self.zstd_level).__enter__()
        self._current.write(batch)
        if self._current.bytes_written >= self.shard_bytes:
            self.close_shard()

    def close_shard(self) -> ShardInfo | None:
        """Finish the current shard (if any) and return its info."""
        if self._current is None:
            return None
        writer, self._current = self._current, None
        writer.__exit__(None, None, None)
        if self.publish is not None:
            self.publish(writer.info.file)
        self.shards.append(writer.info)
        self.next_index += 1
        return writer.info

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed)."""
        if self._current is not None:
            writer, self._current = self._current, None
            writer.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def finish(self, *, targets: TargetSpec, teacher: TeacherInfo, tokenizer: TokenizerInfo, data: DataInfo,
               extra: dict | None = None, all_shards: list[ShardInfo] | None = None) -> Manifest:
        """Close the last shard and write manifest.json (last, atomically). Returns the manifest."""
        self.close_shard()
        shards = sorted(all_shards if all_shards is not None else self.shards, key=lambda s: s.file)
        manifest = Manifest(layout=self.layout, targets=targets, teacher=teacher, tokenizer=tokenizer,
                            data=data, shards=shards, totals=Totals.of(shards), extra=extra or {})
        write_manifest(self.path, manifest)
        if self.publish is not None:
            self.publish(MANIFEST_NAME)
        return manifest

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close_shard()
