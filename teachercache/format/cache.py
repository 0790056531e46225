"""A cache directory as a whole: open one to read (manifest + shards), or write one shard by shard.

>>> cache = Cache.open("CACHE")                      # reads and checks manifest.json
>>> for batch in cache.iter_batches(columns=[...]):  # RowBatch per Arrow record batch, shard by shard
...     ...

Reading checks each shard's SHA-256 against the manifest the first time the shard is opened (one
sequential read of the file; ``verify_checksums=False`` skips it), so a damaged shard is an error naming
the file rather than wrong numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from teachercache.errors import CacheCorruptError
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.manifest import (SHARDS_DIR, DataInfo, Manifest, TargetSpec, TeacherInfo, TokenizerInfo,
                                          Totals, read_manifest, resolve_in_cache, shard_file_name, write_manifest)
from teachercache.format.shards import ZSTD_LEVEL, ShardInfo, ShardReader, ShardWriter, file_kind, file_sha256

DEFAULT_SHARD_BYTES = 512 << 20
"""A new shard is started once the current one holds this many (compressed) bytes."""


class Cache:
    """A complete cache opened for reading."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest, verify_checksums: bool = True):
        self.path = Path(path)
        self.manifest = manifest
        self.layout = manifest.layout
        self.verify_checksums = verify_checksums
        self._verified: set[int] = set()

    @classmethod
    def open(cls, path: str | os.PathLike, verify_checksums: bool = True) -> "Cache":
        return cls(path, read_manifest(path), verify_checksums)

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    def shard_path(self, i: int) -> Path:
        return resolve_in_cache(self.path, self.shards[i].file)

    def regular_shard_path(self, i: int) -> Path:
        """shard_path(i), refused (naming the file as the manifest lists it) unless it is a regular file."""
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
        info, path = self.shards[i], self.regular_shard_path(i)
        size = path.stat().st_size
        if size != info.bytes:
            raise CacheCorruptError(path, f"size {size} bytes, the manifest says {info.bytes} (truncated?)")
        if file_sha256(path) != info.sha256:
            raise CacheCorruptError(path, "SHA-256 differs from the manifest: the file is damaged",
                                    "rebuild the cache or restore the file")

    def open_shard(self, i: int, columns: Sequence[str] | None = None) -> ShardReader:
        if self.verify_checksums and i not in self._verified:
            self.check_shard(i)
            self._verified.add(i)
        return ShardReader(self.regular_shard_path(i), self.layout, columns)

    def iter_batches(self, columns: Sequence[str] | None = None,
                     shards: Sequence[int] | None = None) -> Iterator[RowBatch]:
        for i in range(len(self.shards)) if shards is None else shards:
            with self.open_shard(i, columns) as reader:
                yield from reader


class CacheWriter:
    """Writes RowBatches into size-capped shards of one rank, then (``finish``) the manifest.

    Shards are named shards/part-r{rank}-{index}.arrow. Only rank 0 of a multi-rank build calls
    ``finish`` with every rank's ShardInfos; the build issue's torchrun path does that after a barrier.
    Each ``write`` becomes one Arrow record batch, the unit of compression and of decoding: give it
    thousands of target positions (references to earlier positions only hit where contexts repeat).
    """

    def __init__(self, path: str | os.PathLike, layout: S.Layout, *, rank: int = 0,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, first_index: int = 0, zstd_level: int = ZSTD_LEVEL):
        self.path = Path(path)
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
        return manifest

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close_shard()
