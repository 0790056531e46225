"""The encoder of format version 3 (docs/FORMAT.md, "Target streams, version 3"; the format's constants and
the reference candidates are in codec3.py). Numba kernels: positions in order (sort, check, choose the
reference, hits and ranks, misses), then the value tokens by group, then the id stream with its table;
codec3_reference.encode_targets_reference writes the same bytes in plain Python.
"""

from __future__ import annotations

import numba
import numpy as np

from teachercache.errors import CacheFormatError
from teachercache.format import schema as S
from teachercache.format.bits import MAX_HEADER_VARINT_BYTES, MAX_VARINT_BYTES, popcount, put_varint, take_rank
from teachercache.format.codec2 import position_keys, sort_nearly_sorted, stamp_reference
from teachercache.format.codec3 import (ESCAPE_ID, ESCAPE_TOKEN, GROUP_SIZE, N_CANDIDATES, ONE_BYTE_RANKS, PAIR_BASE,
                                        SINGLE_TOKEN, TABLE_SIZE, batch_streams, candidate_position, lookup_contexts,
                                        record_contexts)
from teachercache.format.quantizer import quantizer_arrays
from teachercache.format.references import context_tables
from teachercache.format.streams import OK, STATUS_TEXT, TargetStreams, check_encode_inputs

SIGNATURE_WORDS = 4
"""Each position's ids hashed into a 256-bit signature: the encoder's cheap estimate of two lists' overlap."""
_HASH = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(nogil=True, cache=True, inline="always")
def signature_bit(t):
    """The bit of id t in a signature: the top 8 bits of t * 0x9E3779B97F4A7C15 (mod 2**64)."""
    return (np.uint64(t) * _HASH) >> np.uint64(56)


@numba.njit(nogil=True, cache=True, inline="always")
def _exact_hits(p, r, target_offsets, canon, seen):
    """How many of position r's ids position p stores (``seen[id] == p`` marks p's ids)."""
    hits = 0
    for i in range(target_offsets[r], target_offsets[r + 1]):
        hits += seen[canon[i]] == p
    return hits


@numba.njit(nogil=True, cache=True, inline="always")
def _best_candidate(p, pair_latest, token_latest, target_offsets, canon, seen, signatures, prev_same_token,
                    prev_same_pair, tried, n_candidates):
    """(selector, reference position) for position p, among the first ``n_candidates``: the two candidates
    whose signatures share most bits with p's (the first on a tie) are counted exactly, and the one holding
    more of p's ids wins (the first on a tie); selector 0 when neither holds any. Reading two lists instead
    of eight keeps the encoder fast; codec3_reference makes the same choice."""
    first_s = second_s = -1
    first_est = second_est = -1
    for s in range(n_candidates):
        r = candidate_position(s, p, pair_latest, token_latest, prev_same_token, prev_same_pair)
        tried[s] = r
        repeat = False
        for i in range(s):
            repeat |= tried[i] == r
        if r < 0 or repeat:  # none, or a list seen already
            continue
        est = 0
        for w in range(SIGNATURE_WORDS):
            est += popcount(signatures[p, w] & signatures[r, w])
        if est > first_est:
            second_s, second_est = first_s, first_est
            first_s, first_est = s, est
        elif est > second_est:
            second_s, second_est = s, est
    best_s, best_hits = 0, 0
    for s in (min(first_s, second_s), max(first_s, second_s)):  # in selector order: the first wins a tie
        if s >= 0:
            hits = _exact_hits(p, tried[s], target_offsets, canon, seen)
            if hits > best_hits:
                best_s, best_hits = s, hits
    return best_s, candidate_position(best_s, p, pair_latest, token_latest, prev_same_token, prev_same_pair)


@numba.njit(nogil=True, cache=True)
def _encode_positions(target_offsets, ids, logprobs, counts, has_counts, cur_tok, prev_tok, starts, steps, bases,
                      max_nats, vocab_size, deltas, hit_out, sel_out, rank_out, cnt_out, miss_ids, miss_syms, canon,
                      seen, signatures, stamp_pos, stamp_idx, unused, last_by_token, pair_keys, pair_pos,
                      prev_same_token, prev_same_pair, n_candidates):
    """Positions in order: check and sort the entries, choose the reference, then per entry its value delta
    (``deltas``), hit bit, rank varint or miss (id and symbol), count varint. Returns (status, position,
    rank bytes, count bytes, misses)."""
    rpos = cpos = n_miss = 0
    tried = np.empty(N_CANDIDATES, np.int64)
    for p in range(len(target_offsets) - 1):
        a, n = target_offsets[p], target_offsets[p + 1] - target_offsets[p]
        if n > 65535:
            return 4, p, rpos, cpos, n_miss
        cur, prev = cur_tok[p], prev_tok[p]
        if cur < 0 or cur >= vocab_size or prev < -1 or prev >= vocab_size:
            return 6, p, rpos, cpos, n_miss
        keys = np.empty(n, np.int64)
        status = position_keys(keys, ids, logprobs, a, p, seen, vocab_size, starts, steps, bases, max_nats)
        if status != OK:
            return status, p, rpos, cpos, n_miss
        sort_nearly_sorted(keys)
        for j in range(n):
            h = signature_bit((keys[j] >> 16) & 0xFFFFFF)
            signatures[p, h >> np.uint64(6)] |= np.uint64(1) << (h & np.uint64(63))
        pair_latest, token_latest, slot, key = lookup_contexts(cur, prev, last_by_token, pair_keys, pair_pos)
        s, r = _best_candidate(p, pair_latest, token_latest, target_offsets, canon, seen, signatures,
                               prev_same_token, prev_same_pair, tried, n_candidates)
        sel_out[p] = s
        if r >= 0:
            stamp_reference(r, p, target_offsets, canon, stamp_pos, stamp_idx, unused)
        prev_c = prev_id = -1
        for j in range(n):
            c = keys[j] >> 40
            t = (keys[j] >> 16) & 0xFFFFFF
            deltas[a + j] = c if j == 0 else c - prev_c
            if r >= 0 and stamp_pos[t] == p:
                hit_out[(a + j) >> 3] |= np.uint8(1 << ((a + j) & 7))
                rpos = put_varint(rank_out, rpos, take_rank(unused, stamp_idx[t]))
            else:
                miss_ids[n_miss] = t
                miss_syms[n_miss] = t - prev_id - 1 if (j > 0 and c == prev_c) else t  # a tie: the id gap
                n_miss += 1
            if has_counts:
                cnt = counts[a + (keys[j] & 0xFFFF)]
                if cnt < 1 or cnt > 65535:
                    return 5, p, rpos, cpos, n_miss
                cpos = put_varint(cnt_out, cpos, cnt - 1)
            canon[a + j] = t
            prev_c, prev_id = c, t
        record_contexts(p, cur, slot, key, pair_latest, last_by_token, pair_keys, pair_pos, prev_same_token,
                        prev_same_pair)
    return OK, -1, rpos, cpos, n_miss


@numba.njit(nogil=True, cache=True, inline="always")
def _value_token(deltas, e, pair_ok):
    """(token, entries taken) for the delta of entry e, paired with entry e + 1's when ``pair_ok``."""
    d = deltas[e]
    if pair_ok and d < PAIR_BASE and deltas[e + 1] < PAIR_BASE:
        return d * PAIR_BASE + deltas[e + 1], 2
    return (SINGLE_TOKEN + d if d < ESCAPE_TOKEN - SINGLE_TOKEN else ESCAPE_TOKEN), 1


@numba.njit(nogil=True, cache=True)
def _encode_values(target_offsets, deltas, n_groups, out):
    """target_values: the number of groups and each group's token bytes, the tokens of each group of
    GROUP_SIZE entry indices (positions in order), then the escaped deltas in decoding order. Returns the
    stream's length. One pass tokenizes into per-group regions sized for a token per entry; a copy packs them."""
    region = np.zeros(n_groups + 1, np.int64)  # group g's tokens go to tokens[region[g]:region[g + 1]]
    for p in range(len(target_offsets) - 1):
        n = target_offsets[p + 1] - target_offsets[p]
        for g in range((n + GROUP_SIZE - 1) // GROUP_SIZE):
            region[g + 1] += min(GROUP_SIZE, n - g * GROUP_SIZE)
    for g in range(n_groups):
        region[g + 1] += region[g]
    tokens = np.empty(len(deltas), np.uint8)
    escaped = np.zeros(len(deltas), np.bool_)
    lengths = np.zeros(n_groups, np.int64)
    for p in range(len(target_offsets) - 1):
        for a in range(target_offsets[p], target_offsets[p + 1], GROUP_SIZE):
            g = (a - target_offsets[p]) // GROUP_SIZE
            end = min(a + GROUP_SIZE, target_offsets[p + 1])
            e = a
            while e < end:
                tok, taken = _value_token(deltas, e, e + 1 < end)
                tokens[region[g] + lengths[g]] = tok
                lengths[g] += 1
                escaped[e] = tok == ESCAPE_TOKEN
                e += taken
    pos = put_varint(out, 0, n_groups)
    for g in range(n_groups):
        pos = put_varint(out, pos, lengths[g])
    for g in range(n_groups):
        out[pos:pos + lengths[g]] = tokens[region[g]:region[g] + lengths[g]]
        pos += lengths[g]
    for e in range(len(deltas)):
        if escaped[e]:
            pos = put_varint(out, pos, deltas[e])
    return pos


@numba.njit(nogil=True, cache=True)
def id_table(miss_ids, vocab_size):
    """The batch's id table: the ids that miss at least twice, most misses first (ties by id), at most
    TABLE_SIZE of them (int64)."""
    n = np.zeros(vocab_size, np.int64)
    for t in miss_ids:
        n[t] += 1
    keys = np.empty(len(miss_ids), np.int64)
    k = 0
    for t in miss_ids:
        if n[t] >= 2:  # the first time an id is met: its key, and its count negated so that it is not met again
            keys[k] = t - (n[t] << 24)  # ascending keys: most misses first, then ascending ids (t < 2**24)
            k += 1
            n[t] = -n[t]
    return np.sort(keys[:k])[:TABLE_SIZE] & 0xFFFFFF


@numba.njit(nogil=True, cache=True)
def _put_planes(out, pos, symbols, id_bytes):
    """``symbols`` as ``id_bytes`` little-endian byte planes at out[pos:]; returns the new end."""
    for q in range(id_bytes):
        for i in range(len(symbols)):
            out[pos + q * len(symbols) + i] = (symbols[i] >> (8 * q)) & 0xFF
    return pos + id_bytes * len(symbols)


@numba.njit(nogil=True, cache=True)
def _encode_ids(miss_ids, miss_syms, id_bytes, vocab_size):
    """target_ids of a batch from its misses in decoding order (ids, and symbols: the id or a tie's gap):
    the header, the table's planes, a first byte per miss, the second bytes of the two-byte ranks, the
    escaped symbols' planes."""
    table = id_table(miss_ids, vocab_size)
    rank_of = np.full(vocab_size, -1, np.int64)
    for i in range(len(table)):
        rank_of[table[i]] = i
    first = np.empty(len(miss_ids), np.uint8)
    second = np.empty(len(miss_ids), np.uint8)
    escaped = np.empty(len(miss_ids), np.int64)
    n_second = n_esc = 0
    for i in range(len(miss_ids)):
        r = rank_of[miss_ids[i]]
        if r < 0:
            first[i] = ESCAPE_ID
            escaped[n_esc] = miss_syms[i]
            n_esc += 1
        elif r < ONE_BYTE_RANKS:
            first[i] = r
        else:
            first[i] = ONE_BYTE_RANKS + ((r - ONE_BYTE_RANKS) >> 8)
            second[n_second] = (r - ONE_BYTE_RANKS) & 0xFF
            n_second += 1
    out = np.empty(4 * MAX_HEADER_VARINT_BYTES + (len(table) + n_esc) * id_bytes + len(miss_ids) + n_second, np.uint8)
    pos = 0
    for x in (len(miss_ids), len(table), n_second, n_esc):
        pos = put_varint(out, pos, x)
    pos = _put_planes(out, pos, table, id_bytes)
    out[pos:pos + len(miss_ids)] = first
    pos += len(miss_ids)
    out[pos:pos + n_second] = second[:n_second]
    pos = _put_planes(out, pos + n_second, escaped[:n_esc], id_bytes)
    return out[:pos]


def encode_targets(row_positions, target_offsets, ids, logprobs, counts, contexts, layout: S.Layout,
                   where: str = "<batch>", candidates: int = N_CANDIDATES) -> TargetStreams:
    """Encode the CSR targets of a record batch into version 3's streams (numba kernels).

    ``contexts`` is (cur, prev) from references.position_contexts(); ``counts`` is None unless sampled. The
    encoder chooses each position's reference among selectors 0 .. ``candidates`` - 1 (all eight unless
    tools/bench_codec.py measures fewer; any choice decodes)."""
    if not 1 <= candidates <= N_CANDIDATES:
        raise ValueError(f"candidates must be in [1, {N_CANDIDATES}], got {candidates}")
    has_counts = counts is not None
    row_positions, target_offsets, ids, logprobs, counts, cur, prev = check_encode_inputs(
        row_positions, target_offsets, ids, logprobs, counts, contexts, layout, where)
    n_pos, n_entries, V = len(target_offsets) - 1, len(ids), layout.vocab_size
    if n_pos == 0:
        return batch_streams(dict.fromkeys(TargetStreams.STREAMS, np.zeros(0, np.uint8)), len(row_positions) - 1)
    starts, steps, bases = quantizer_arrays(layout.quantizer)
    max_size = int(np.diff(target_offsets).max())
    deltas, miss_ids, miss_syms = (np.empty(n_entries, np.int64) for _ in range(3))
    hits = np.zeros((n_entries + 7) >> 3, np.uint8)
    selectors = np.empty(n_pos, np.uint8)
    ranks = np.empty(n_entries * MAX_VARINT_BYTES, np.uint8)
    cnts = np.empty(n_entries * MAX_VARINT_BYTES if has_counts else 0, np.uint8)
    status, at, n_rank, n_cnt, n_miss = _encode_positions(
        target_offsets, ids, logprobs, counts, has_counts, cur, prev, starts, steps, bases,
        float(layout.quantizer.max_nats), V, deltas, hits, selectors, ranks, cnts, miss_ids, miss_syms,
        np.empty(n_entries, np.int32), np.full(V, -1, np.int64), np.zeros((n_pos, SIGNATURE_WORDS), np.uint64),
        np.full(V, -1, np.int64), np.zeros(V, np.int64),
        np.zeros((max_size + 63) // 64 + 1, np.uint64), *context_tables(V, n_pos), np.empty(n_pos, np.int64),
        np.empty(n_pos, np.int64), int(candidates))
    if status != OK:
        raise CacheFormatError(where, f"target position {at}: {STATUS_TEXT[status]}")
    n_groups = (max_size + GROUP_SIZE - 1) // GROUP_SIZE
    values = np.empty(n_entries * (1 + MAX_VARINT_BYTES) + (n_groups + 1) * MAX_HEADER_VARINT_BYTES, np.uint8)
    n_val = _encode_values(target_offsets, deltas, n_groups, values)
    return batch_streams({"ids": _encode_ids(miss_ids[:n_miss], miss_syms[:n_miss], layout.id_bytes, V),
                          "values": values[:n_val], "hits": hits,
                          "refs": np.concatenate([selectors, ranks[:n_rank]]), "counts": cnts[:n_cnt]},
                         len(row_positions) - 1)
