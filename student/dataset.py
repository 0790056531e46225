"""Rows of a cache for training: partitioned over DDP ranks and DataLoader workers, shuffled, resumable.

    dataset = CacheDataset("CACHE", seed=0, hidden_layers=[12])      # one row dict per yielded item
    loader = make_loader(dataset, batch_size=8, num_workers=2, collate=partial(collate_rows, pad_id=0))
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader:                                           # a student.collate.StudentBatch
            ...

Every row reaches exactly one (rank, DataLoader worker) per epoch: the epoch's order of shards and
record batches depends on (seed, epoch) alone, so every process computes the same partition; each
consumer then shuffles its own rows in a bounded buffer. ``set_position`` resumes an epoch exactly where
a DataLoader had stopped. docs/train.md ("How rows reach ranks and workers") derives all of it. The plans
(which rows a consumer reads, in which order) are pure functions, tested apart from the reading; rows are
dicts of numpy arrays (see CacheDataset), and student.collate turns a list of them into a batch.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from teachercache.student import collate as collation
from teachercache.errors import CacheError, CacheFormatError
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.cache import Cache
from teachercache.format.manifest import MANIFEST_NAME
from teachercache.format.records import decode_batch

DEFAULT_SHUFFLE_BUFFER = 1024
"""Rows a consumer's shuffle buffer holds by default."""


# --------------------------------------------------------------------------------------------------------
# Plans: which rows a consumer reads, in which order. Pure functions of the record-batch sizes and seeds.


def record_batch_rows(cache: Cache) -> list[np.ndarray]:
    """Rows of every record batch, per shard: ``[shard] -> (num_batches,) int64``.

    Only the small ``target_mask`` column of each record batch is read (no target is decoded); the counts
    must add up to the manifest's rows of each shard. A cache at a URL reads them from the shards' message
    headers, without downloading the shards (format.mirror.Mirror.batch_rows).
    """
    if cache.mirror is not None:
        counted = cache.mirror.batch_rows(cache.shards)
        for i, (info, rows) in enumerate(zip(cache.shards, counted)):
            if int(rows.sum()) != info.rows:
                raise CacheFormatError(cache.shard_location(i), f"holds {int(rows.sum())} rows, the manifest says "
                                       f"{info.rows}", "run `teachercache verify` and rebuild the cache")
        return counted
    out = []
    for i, info in enumerate(cache.shards):
        with cache.open_shard(i, columns=[S.TARGET_MASK]) as reader:
            rows = np.array([reader.read_record_batch(j).num_rows for j in range(reader.num_batches)], np.int64)
        if int(rows.sum()) != info.rows:
            raise CacheFormatError(cache.shard_path(i), f"holds {int(rows.sum())} rows, the manifest says "
                                   f"{info.rows}", "run `teachercache verify` and rebuild the cache")
        out.append(rows)
    return out


def epoch_order(batch_rows: Sequence[np.ndarray], seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """(N, 2) int64 (shard, record batch) pairs in the epoch's reading order.

    File order without shuffling; otherwise the shards are permuted, then the record batches inside each
    shard, by a generator seeded with (seed, epoch): the same order in every process.
    """
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    shards = rng.permutation(len(batch_rows)) if shuffle else np.arange(len(batch_rows))
    pairs = []
    for shard in shards:
        n = len(batch_rows[shard])
        batches = rng.permutation(n) if shuffle else np.arange(n)
        pairs.append(np.stack([np.full(n, shard, np.int64), batches.astype(np.int64)], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def consumer_rows(lengths: np.ndarray, consumer: int, consumers: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of one consumer, in stream order, given the stream's record-batch lengths ``(N,)``.

    Stream row s belongs to consumer ``s mod consumers`` (consumer = rank + world * worker, consumers =
    world * num_workers). Returns (index of the record batch in the stream, row inside that batch), each
    ``(n,)`` int64.
    """
    lengths = np.asarray(lengths, np.int64)
    starts = np.cumsum(lengths) - lengths
    first = (consumer - starts) % consumers                         # (N,) first of our rows in each batch
    counts = np.where(first < lengths, (lengths - first + consumers - 1) // consumers, 0)
    batch = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    nth = np.arange(len(batch), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return batch, np.repeat(first, counts) + consumers * nth


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``size`` items emits a stream of ``n``: ``(n,)`` int64.

    The buffer fills with the first ``size`` items; then each new item replaces a uniformly drawn one,
    which is emitted; at the end the rest of the buffer is emitted in random order. Item ``out[k]`` is
    never later in the stream than item ``k + size``, so a reader needs at most ``size`` items in memory.
    """
    out = np.empty(n, np.int64)
    buffer = list(range(min(size, n)))
    draws = rng.integers(0, size, max(n - size, 0)).tolist()
    for k, item in enumerate(range(size, n)):
        j = draws[k]
        out[k], buffer[j] = buffer[j], item
    out[max(n - size, 0):] = rng.permutation(np.array(buffer, np.int64))
    return out


def rows_delivered(batches_consumed: int, batch_size: int, worker: int, num_workers: int) -> int:
    """Rows worker ``worker`` of ``num_workers`` has delivered once a DataLoader has handed out
    ``batches_consumed`` batches round-robin (full batches assumed; see docs/train.md, "Resume")."""
    return max(0, math.ceil((batches_consumed - worker) / num_workers)) * batch_size


# --------------------------------------------------------------------------------------------------------
# The dataset.


def _default_rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CacheDataset(IterableDataset):
    """Rows of a cache, one dict of numpy arrays per item (T tokens, P target positions, E entries):
    ``input_ids`` (T,) int64; ``target_mask`` (T,) bool, True at t when the teacher's distribution of
    token t+1 is stored (never at the last token); ``target_offsets`` (P+1,) int64 into this row's
    entries; ``target_ids`` (E,) int64; ``target_logprobs`` (E,) float32; ``target_counts`` (E,) int64
    draws, sampled caches only (absent otherwise); ``label_logprob`` and ``rest_mass`` (P,) float32;
    ``hidden`` {layer: (P, H) float32}, only when ``hidden_layers`` asks for some; ``row_index`` the
    row's global index g in file order.

    Arguments: ``path`` the cache directory or URL (or an open Cache); ``rank``/``world_size`` the DDP share
    (default: from torch.distributed when it is initialised, else 0 of 1); ``seed`` and ``shuffle`` the epoch
    order and ``shuffle_buffer`` the rows a consumer's buffer holds; ``hidden_layers`` the teacher layers whose
    hidden states to read (none: the hidden-state columns are never read); ``verify_checksums``,
    ``prefetch_shards``, ``cache_dir`` and ``cache_dir_bytes`` passed to ``Cache.open`` (the last three matter
    for a cache at a URL: shards downloaded ahead of the reader, kept in an LRU directory). Opening reads every
    record batch's row count (the small target_mask column only, some 30 us a record batch), and checks every
    shard's checksum unless told not to; worker processes inherit both.
    """

    def __init__(self, path: str | os.PathLike | Cache, *, rank: int | None = None, world_size: int | None = None,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 hidden_layers: Sequence[int] = (), verify_checksums: bool = True, prefetch_shards: int | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_dir_bytes: int | None = None):
        super().__init__()
        default_rank, default_world = _default_rank_world()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"CacheDataset: rank {self.rank} is not in [0, world_size {self.world_size})")
        if seed < 0 or shuffle_buffer < 1:
            raise ValueError(f"CacheDataset: seed {seed} must be >= 0 and shuffle_buffer {shuffle_buffer} >= 1")
        self.cache = path if isinstance(path, Cache) else Cache.open(
            path, verify_checksums=verify_checksums, prefetch_shards=prefetch_shards, cache_dir=cache_dir,
            cache_dir_bytes=cache_dir_bytes)
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), bool(shuffle), int(shuffle_buffer)
        layout = self.cache.layout
        self.hidden_layers = tuple(sorted({int(x) for x in hidden_layers}))
        missing = [x for x in self.hidden_layers if x not in layout.hidden_layers]
        if missing:
            stored = ", ".join(map(str, layout.hidden_layers)) or "none"
            raise CacheError(f"{self.cache.location}/{MANIFEST_NAME}",
                             f"hidden layers {missing} are not stored in this cache (stored: {stored})",
                             "ask for stored layers only, or rebuild the cache with --hidden-layers")
        # Everything but the entropy (inspection only) and the hidden layers not asked for.
        self.columns = [c for c in layout.columns() if c != S.ENTROPY and not c.startswith(S.HIDDEN_PREFIX)]
        self.columns += [S.hidden_column(x) for x in self.hidden_layers]
        self.batch_rows = record_batch_rows(self.cache)
        self._file_starts = self._global_starts()
        self.epoch = 0
        self._position: tuple[int, int, int] | None = None  # (epoch, batches_consumed, batch_size)

    def _global_starts(self) -> list[np.ndarray]:
        """Global row index (file order) of the first row of every record batch, per shard."""
        out, start = [], 0
        for rows in self.batch_rows:
            out.append(start + np.cumsum(rows) - rows)
            start += int(rows.sum())
        return out

    @property
    def num_rows(self) -> int:
        """Rows of the whole cache."""
        return self.cache.manifest.totals.rows

    @property
    def rank_rows(self) -> int:
        """Rows this rank reads per epoch."""
        return (self.num_rows - self.rank + self.world_size - 1) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (its shuffle); call it before iterating a DataLoader, every epoch. A position
        set for another epoch is dropped."""
        if self._position is not None and self._position[0] != epoch:
            self._position = None
        self.epoch = int(epoch)

    def set_position(self, epoch: int, batches_consumed: int, batch_size: int) -> None:
        """Resume epoch ``epoch`` after a DataLoader (``make_loader``, same batch size, workers and world
        size) had delivered ``batches_consumed`` batches of ``batch_size`` rows on this rank. It stays in
        force for every iteration of that epoch until ``set_epoch`` moves to another epoch."""
        if batches_consumed < 0 or batch_size < 1:
            raise ValueError(f"set_position: batches_consumed {batches_consumed} must be >= 0 and "
                             f"batch_size {batch_size} >= 1")
        self.epoch = int(epoch)
        self._position = (int(epoch), int(batches_consumed), int(batch_size))

    def plan(self, worker: int = 0, num_workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stream of one consumer in this epoch, before the shuffle buffer and the resume skip:
        ((N, 2) (shard, record batch) reading order, (n,) index into it, (n,) row inside the batch)."""
        order = epoch_order(self.batch_rows, self.seed, self.epoch, self.shuffle)
        flat = np.concatenate(self.batch_rows) if self.batch_rows else np.zeros(0, np.int64)
        first_of_shard = np.cumsum([len(r) for r in self.batch_rows]) - [len(r) for r in self.batch_rows]
        lengths = flat[first_of_shard[order[:, 0]] + order[:, 1]] if len(order) else np.zeros(0, np.int64)
        batch, row = consumer_rows(lengths, self.rank + self.world_size * worker, self.world_size * num_workers)
        return order, batch, row

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        process, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumed, batch_size = 0, 1
        if self._position is not None and self._position[0] == self.epoch:
            consumed, batch_size = self._position[1:]
        # A new DataLoader asks its worker 0 first, but the interrupted one would have asked worker
        # consumed mod W next: worker process j takes over the stream of worker (j + consumed) mod W.
        worker = (process + consumed) % num_workers
        order, batch, row = self.plan(worker, num_workers)
        n = len(batch)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            out = shuffle_buffer_order(n, self.shuffle_buffer, rng)
        else:
            out = np.arange(n, dtype=np.int64)
        skip = min(n, rows_delivered(consumed, batch_size, worker, num_workers))
        needed = np.zeros(n, bool)
        needed[out[skip:]] = True
        return self._stream(order, batch, row, out, skip, needed)

    def _stream(self, order, batch, row, out, skip, needed) -> Iterator[dict]:
        """Decode the record batches holding needed rows, in stream order, and emit rows in ``out`` order
        from ``skip`` on as soon as they are decoded (at most a shuffle buffer's worth waits)."""
        pending: dict[int, dict] = {}
        k, n = skip, len(out)
        items = np.flatnonzero(needed)                 # stream items to decode, ascending
        cuts = np.flatnonzero(np.diff(batch[items])) + 1
        shards = order[batch[items], 0] if len(items) else np.zeros(0, np.int64)
        self.cache.prefetch(shards[np.r_[True, shards[1:] != shards[:-1]]].tolist() if len(shards) else [])
        shard_open, reader = -1, None
        try:
            for group in np.split(items, cuts) if len(items) else []:
                shard, index = (int(x) for x in order[batch[group[0]]])
                if shard != shard_open:
                    if reader is not None:
                        reader.close()
                    reader, shard_open = self.cache.open_shard(shard, self.columns), shard
                rows = row[group]
                record = reader.read_record_batch(index)
                if self.cache.layout.format_version < 3:
                    # version 2 references point back only: the rows past the last one needed can be left
                    # out; a version 3 batch's streams cover all of its rows and decode as one
                    record = record.slice(0, int(rows.max()) + 1)
                decoded = decode_batch(record, self.cache.layout, where=f"{reader.path} (batch {index})")
                start = int(self._file_starts[shard][index])
                for item, r in zip(group.tolist(), rows.tolist()):
                    pending[item] = _row(decoded, r, start + r, reader.path, index)
                while k < n and int(out[k]) in pending:
                    yield pending.pop(int(out[k]))
                    k += 1
        finally:
            if reader is not None:
                reader.close()


def _row(batch: RowBatch, r: int, global_index: int, path, index: int) -> dict:
    """Row ``r`` of a decoded record batch as a dict of numpy arrays (copies: a row must not keep its
    whole batch alive in a shuffle buffer)."""
    a, b = int(batch.row_offsets[r]), int(batch.row_offsets[r + 1])
    p0, p1 = int(batch.row_positions[r]), int(batch.row_positions[r + 1])
    e0, e1 = int(batch.target_offsets[p0]), int(batch.target_offsets[p1])
    row = {
        "input_ids": batch.input_ids[a:b].astype(np.int64),                      # (T,)
        "target_mask": batch.target_mask[a:b].copy(),                             # (T,) bool
        "target_offsets": batch.target_offsets[p0:p1 + 1] - e0,                   # (P+1,) int64, local
        "target_ids": batch.target_ids[e0:e1].astype(np.int64),                   # (E,)
        "target_logprobs": batch.target_logprobs[e0:e1].astype(np.float32),       # (E,)
        "label_logprob": batch.label_logprob[p0:p1].copy(),                       # (P,) float32
        "rest_mass": batch.rest_mass[p0:p1].copy(),                               # (P,) float32
        "row_index": global_index,
    }
    if batch.target_counts is not None:
        row["target_counts"] = batch.target_counts[e0:e1].astype(np.int64)       # (E,) draws
    if batch.hidden:
        row["hidden"] = {layer: h[p0:p1].copy() for layer, h in batch.hidden.items()}  # (P, H) float32
    collation.check_row(row, f"{path} (record batch {index}, row {r})")
    return row


# --------------------------------------------------------------------------------------------------------
# The DataLoader.


def make_loader(dataset: CacheDataset, batch_size: int, num_workers: int = 0,
                collate: Callable[[list], object] | None = None, **kwargs) -> DataLoader:
    """A DataLoader over a CacheDataset that ``set_position`` can resume: the dataset yields single rows,
    the DataLoader batches ``batch_size`` of them per worker (``drop_last=False``: a worker's last batch
    of the epoch may be short) and hands batches out round-robin in worker order (``in_order=True``).
    Workers are not persistent, so ``set_epoch``/``set_position`` reach them each epoch. ``collate``
    defaults to ``student.collate.collate_rows`` with pad id 0; other keyword arguments go to the DataLoader (for
    example ``pin_memory``, ``prefetch_factor``, ``multiprocessing_context``)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate if collate is not None else partial(collation.collate_rows, pad_id=0),
                      drop_last=False, persistent_workers=False, in_order=True, **kwargs)
