"""Reference positions of the target codec: which earlier position's id list a position's hits point into.

A target position's context is (prev, cur): its token and the token before it in the row (-1 at a row's
first token; codec.position_contexts). Its reference position is the latest earlier target position of
the record batch with the same (prev, cur), else the latest with the same cur, else none (-1); see
docs/FORMAT.md, "References". Encoder and decoder visit positions in order, look each one up, then record
it. The kernels keep a last-position-per-token array and an open-addressing (prev, cur) table, both from
``context_tables``; the plain Python references keep a dict.
"""

from __future__ import annotations

import numba
import numpy as np


def position_contexts(input_ids: np.ndarray, target_mask: np.ndarray,
                      row_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cur, prev) int64 per target position: the token at the position, and the token before it in the
    same row (-1 at a row's first token). These pick each position's reference position."""
    input_ids = np.asarray(input_ids, np.int64)
    row_offsets = np.asarray(row_offsets, np.int64)
    tok = np.flatnonzero(target_mask)
    cur = input_ids[tok]
    row_start = np.zeros(len(input_ids), bool)
    row_start[row_offsets[:-1][row_offsets[:-1] < len(input_ids)]] = True
    prev = np.where(row_start[tok], -1, input_ids[np.maximum(tok - 1, 0)])
    return cur, prev


def context_tables(vocab_size: int, n_positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(last_by_token, pair_keys, pair_pos), empty (-1): the kernels' tables for a batch of n positions;
    the pair table has more than twice as many slots as positions, a power of two."""
    size = 1 << max(4, int(2 * n_positions + 1).bit_length())
    return (np.full(vocab_size, -1, np.int64), np.full(size, -1, np.int64), np.full(size, -1, np.int64))


@numba.njit(nogil=True, cache=True, inline="always")
def _pair_slot(keys, key):
    """Slot of ``key`` in an open-addressing table (linear probing; never full: 2x the positions)."""
    mask = len(keys) - 1
    h = ((key * np.int64(-7046029254386353131)) >> 20) & mask
    while keys[h] != -1 and keys[h] != key:
        h = (h + 1) & mask
    return h


@numba.njit(nogil=True, cache=True, inline="always")
def reference_position(cur, prev, last_by_token, pair_keys, pair_pos):
    """(reference position or -1, slot, key) of a position with context (prev, cur); pass slot and key
    to record_position once the position is done."""
    key = (prev + 1) * np.int64(1 << 25) + cur
    slot = _pair_slot(pair_keys, key)
    r = pair_pos[slot] if pair_keys[slot] == key else -1
    if r < 0:
        r = last_by_token[cur]
    return r, slot, key


@numba.njit(nogil=True, cache=True, inline="always")
def record_position(p, cur, slot, key, last_by_token, pair_keys, pair_pos):
    """Make position p the latest with its token and with its (prev, cur) pair."""
    last_by_token[cur] = p
    pair_keys[slot] = key
    pair_pos[slot] = p


def reference_position_python(tables: dict, cur: int, prev: int) -> int:
    """Plain Python reference of reference_position: latest same (prev, cur), else same cur, else -1."""
    return tables.get(("pair", prev, cur), tables.get(("token", cur), -1))


def record_position_python(tables: dict, p: int, cur: int, prev: int) -> None:
    """Plain Python reference of record_position."""
    tables[("token", cur)] = tables[("pair", prev, cur)] = p
