"""Rows of a cache one at a time, and the per-position facts the inspection tools share.

A RowBatch is flat (CSR over a whole record batch); the inspection tools (show, diff, export) think in
rows: "row 12 of the cache, its tokens, and at each target position the stored ids". ``CacheRow`` is that
view, ``iter_cache_rows`` streams them (one decoded record batch in memory at a time) and ``read_row`` finds
one row by its number without decoding the record batches before it.

The per-position helpers work on a whole RowBatch at once (numpy, no Python loop over positions):
``target_tokens`` (where each target position sits), ``next_tokens`` (the actual next token it predicts)
and ``label_ranks`` (where that token is in the stored list).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from teachercache.errors import TeachercacheError
from teachercache.format.batch import RowBatch
from teachercache.format.cache import Cache


class RowError(TeachercacheError):
    """A row number that the cache does not hold."""


def target_tokens(batch: RowBatch) -> np.ndarray:
    """(P,) int64: the index (into batch.input_ids) of each target position's token."""
    return np.flatnonzero(batch.target_mask)


def next_tokens(batch: RowBatch) -> np.ndarray:
    """(P,) int64: the actual next token of each target position (-1 where the position is its row's last
    token, which a sound cache never marks)."""
    tok = target_tokens(batch)
    row_end = np.repeat(batch.row_offsets[1:], np.diff(batch.row_offsets))[tok] if len(tok) else tok
    nxt = np.minimum(tok + 1, max(len(batch.input_ids) - 1, 0))
    return np.where(tok + 1 < row_end, np.asarray(batch.input_ids, np.int64)[nxt], -1)


def entry_positions(batch: RowBatch) -> np.ndarray:
    """(E,) int64: the target position each stored entry belongs to."""
    return np.repeat(np.arange(batch.num_positions), batch.target_sizes)


def label_ranks(batch: RowBatch) -> np.ndarray:
    """(P,) int64: 1-based rank of the actual next token in its position's stored list (entries are in
    descending probability), 0 where it is not stored."""
    pos = entry_positions(batch)
    hit = np.asarray(batch.target_ids, np.int64) == next_tokens(batch)[pos]
    ranks = np.zeros(batch.num_positions, np.int64)
    entries = np.flatnonzero(hit)
    # reversed so that, should an id repeat (a damaged cache), the first (best) rank wins
    ranks[pos[entries][::-1]] = (entries - batch.target_offsets[pos[entries]] + 1)[::-1]
    return ranks


@dataclass
class CacheRow:
    """One training sequence of a cache with its decoded targets. Per-position arrays are (P,) in token
    order; the stored entries of the j-th position are ``ids[offsets[j]:offsets[j+1]]``."""

    index: int
    """Row number in the whole cache (shards in manifest order, rows in file order)."""
    shard: int
    """Index of its shard in the manifest."""
    row_in_shard: int
    input_ids: np.ndarray
    """(T,) int32 tokens."""
    target_mask: np.ndarray
    """(T,) bool."""
    offsets: np.ndarray
    """(P+1,) int64 into ids/logprobs/counts."""
    ids: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray | None
    label_logprob: np.ndarray
    rest_mass: np.ndarray
    entropy: np.ndarray
    hidden: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def positions(self) -> np.ndarray:
        """(P,) token index of each target position."""
        return np.flatnonzero(self.target_mask)

    @property
    def next_ids(self) -> np.ndarray:
        """(P,) the actual next token of each target position."""
        return np.asarray(self.input_ids, np.int64)[np.minimum(self.positions + 1, len(self.input_ids) - 1)]

    def entries(self, j: int) -> slice:
        return slice(int(self.offsets[j]), int(self.offsets[j + 1]))


def rows_of_batch(batch: RowBatch, first_index: int, shard: int, first_in_shard: int) -> Iterator[CacheRow]:
    """The rows of a decoded RowBatch (the views share its arrays)."""
    for b in range(batch.num_rows):
        t0, t1 = batch.row_offsets[b], batch.row_offsets[b + 1]
        p0, p1 = batch.row_positions[b], batch.row_positions[b + 1]
        e0, e1 = batch.target_offsets[p0], batch.target_offsets[p1]
        yield CacheRow(index=first_index + b, shard=shard, row_in_shard=first_in_shard + b,
                  input_ids=batch.input_ids[t0:t1], target_mask=batch.target_mask[t0:t1],
                  offsets=batch.target_offsets[p0:p1 + 1] - e0, ids=batch.target_ids[e0:e1],
                  logprobs=batch.target_logprobs[e0:e1],
                  counts=None if batch.target_counts is None else batch.target_counts[e0:e1],
                  label_logprob=batch.label_logprob[p0:p1], rest_mass=batch.rest_mass[p0:p1],
                  entropy=batch.entropy[p0:p1], hidden={k: v[p0:p1] for k, v in batch.hidden.items()})


def iter_cache_rows(cache: Cache, columns: Sequence[str] | None = None) -> Iterator[CacheRow]:
    """Every row of the cache in order, decoding one record batch at a time."""
    index = 0
    for i in range(len(cache.shards)):
        in_shard = 0
        with cache.open_shard(i, columns) as reader:
            for batch in reader:
                yield from rows_of_batch(batch, index, i, in_shard)
                index += batch.num_rows
                in_shard += batch.num_rows


def read_row(cache: Cache | str | os.PathLike, n: int) -> CacheRow:
    """Row ``n`` of the cache; only its record batch is decoded."""
    cache = cache if isinstance(cache, Cache) else Cache.open(cache)
    total = cache.manifest.totals.rows
    if not 0 <= n < total:
        raise RowError(f"{cache.path}: row {n} does not exist (the cache holds rows 0 to {total - 1}); "
                       "give --row between them")
    first = 0
    for i, info in enumerate(cache.shards):
        if n >= first + info.rows:
            first += info.rows
            continue
        with cache.open_shard(i) as reader:
            in_shard = 0
            for b in range(reader.num_batches):
                rows = reader.read_record_batch(b).num_rows
                if n < first + in_shard + rows:
                    batch = reader.read_batch(b)
                    k = n - first - in_shard
                    return next(r for j, r in enumerate(rows_of_batch(batch, first + in_shard, i, in_shard))
                                if j == k)
                in_shard += rows
    raise RowError(f"{cache.path}: row {n} is not in the shards although the manifest counts it "
                   "(run `teachercache verify`)")
