"""Format version 3 of the target codec: the sparse targets of a record batch as five byte streams of the
whole batch (docs/FORMAT.md, "Target streams, version 3"). This module holds the format's constants and
what its encoder (codec3_encode.py) and decoder (codec3_decode.py) share; codec3_reference.py is both in
plain Python.

What changed from version 2 (codec2.py), each chosen by tools/bench_codec.py (BENCHMARKS.md has the table):

* Reference choice. Each position's hits point into one of eight earlier lists (the latest two with the
  same (prev, cur) context, the latest four with the same token, the two positions before it); the
  encoder picks the one holding the most of the position's ids (of the two whose hashed signatures
  overlap the position's most) and writes its index, a *selector* byte per position, at the head of
  target_refs. Version 2 had one fixed rule (the first of these, else the second).
* Values by entry index. The value deltas are written entry index by entry index (all positions' first
  entries, then all second entries...): zstd's Huffman tables then see deltas of like entries together.
  Two deltas below 10 share a byte ("pair token"), others up to 154 take one, larger ones are escaped
  to varints after the tokens.
* Miss ids by frequency. The ids that miss two or more times in the batch go into a table, most
  frequent first, and a miss is its rank there (one byte for the first 192 ranks, two up to 16,320);
  the other misses are escapes, written as byte planes like version 2's symbols.
* Streams per batch. Each stream is one sequence for the whole record batch (a batch is the unit of
  decoding already: references cross rows), so a plane's bytes lie together for zstd. It is the batch's
  first row's list; the other rows' lists are empty.

Kernels follow codec2's rules: numba ``nogil``, serial, every read checked against its stream's end and
every index against its list; a violation is a status code (teachercache.format.streams.STATUS_TEXT) that
the caller turns into a CacheCorruptError naming the shard, the position and the column.
"""

from __future__ import annotations

import numba
import numpy as np

from teachercache.format.references import reference_position
from teachercache.format.streams import TargetStreams

N_CANDIDATES = 8
"""Reference candidates per position; the selector byte is below this."""
GROUP_SIZE = 8
"""target_values holds the tokens of entry indices 0-7 of every position, then of 8-15, ... (groups)."""
PAIR_BASE = 10
"""A pair token holds two deltas below this: token = first * 10 + second (0..99)."""
SINGLE_TOKEN = 100
"""Tokens 100..254 hold one delta below 155: delta = token - 100."""
ESCAPE_TOKEN = 255
"""Token 255: the delta is the next varint of the escape part of target_values."""
ONE_BYTE_RANKS = 192
"""Table ranks below this are one byte in the id stream; ranks up to TABLE_SIZE take a second byte."""
TABLE_SIZE = ONE_BYTE_RANKS + 63 * 256
"""The most ids an id table holds (16,320)."""
ESCAPE_ID = 255
"""The id stream's byte for a miss that is not in the table: its symbol follows in the escape planes."""

TOKEN_FIRST = np.array([t // PAIR_BASE if t < SINGLE_TOKEN else t - SINGLE_TOKEN if t < ESCAPE_TOKEN else 0
                        for t in range(256)], np.int64)
"""The (first) delta of each value token (0 for the escape token, whose delta is a varint)."""
TOKEN_SECOND = np.array([t % PAIR_BASE if t < SINGLE_TOKEN else -1 for t in range(256)], np.int64)
"""The second delta of a pair token, -1 for the other tokens."""


# ---------------------------------------------------------------------------------------------------
# Reference candidates: the same for the encoder and the decoder.


@numba.njit(nogil=True, cache=True, inline="always")
def candidate_position(s, p, pair_latest, token_latest, prev_same_token, prev_same_pair):
    """Reference candidate ``s`` of position p, or -1: 0 the latest earlier position with the same (prev,
    cur) pair, 1..4 the latest four with the same cur, 5 and 6 the positions p-1 and p-2, 7 the pair's
    second latest. ``prev_same_*[q]``: the position before q with q's token / pair (-1: none)."""
    if s == 0:
        return pair_latest
    if s <= 4:
        r = token_latest
        for _ in range(s - 1):
            if r < 0:
                return r
            r = prev_same_token[r]
        return r
    if s <= 6:
        return p - (s - 4) if p >= s - 4 else -1
    return prev_same_pair[pair_latest] if pair_latest >= 0 else -1


@numba.njit(nogil=True, cache=True, inline="always")
def lookup_contexts(cur, prev, last_by_token, pair_keys, pair_pos):
    """(pair_latest, token_latest, slot, key) of a position with context (prev, cur)."""
    _, slot, key = reference_position(cur, prev, last_by_token, pair_keys, pair_pos)  # version 2's lookup
    pair_latest = pair_pos[slot] if pair_keys[slot] == key else -1
    return pair_latest, last_by_token[cur], slot, key


@numba.njit(nogil=True, cache=True, inline="always")
def record_contexts(p, cur, slot, key, pair_latest, last_by_token, pair_keys, pair_pos, prev_same_token,
                    prev_same_pair):
    """Make position p the latest with its token and its pair, remembering the ones it replaces."""
    prev_same_token[p] = last_by_token[cur]
    prev_same_pair[p] = pair_latest
    last_by_token[cur] = p
    pair_keys[slot] = key
    pair_pos[slot] = p


def batch_streams(parts: dict[str, np.ndarray], n_rows: int) -> TargetStreams:
    """TargetStreams with each batch stream in the first row: offsets (0, n, n, ..., n)."""
    def offsets(stream):
        out = np.full(n_rows + 1, len(stream), np.int64)
        out[0] = 0
        return out

    fields = {}
    for name in TargetStreams.STREAMS:
        fields[name] = np.ascontiguousarray(parts[name], np.uint8)
        fields[name[:-1] + "_offsets"] = offsets(fields[name])
    return TargetStreams(**fields)


def batch_stream(offsets: np.ndarray, stream: np.ndarray) -> np.ndarray | None:
    """A version 3 stream: the first row's bytes (offsets already checked), or None if another row holds any:
    the writer puts all of a batch's stream in its first row, so bytes elsewhere mean a damaged batch."""
    if len(offsets) > 1 and offsets[1] != offsets[-1]:
        return None
    return stream[offsets[0]:offsets[-1]]
