"""The decoder of format version 3 (docs/FORMAT.md, "Target streams, version 3"; the format's constants and
the reference candidates are in codec3.py). One numba kernel visits the positions in order and, per entry,
reads its value token, hit bit and rank or miss byte; codec3_reference.decode_targets_reference is the same
in plain Python. Every read is checked against its stream's end and every index against its list; a
violation is a status code (teachercache.format.streams.STATUS_TEXT) that decode_targets turns into a
CacheCorruptError naming the shard, the position and the column.
"""

from __future__ import annotations

import numba
import numpy as np

from teachercache.errors import CacheCorruptError
from teachercache.format import schema as S
from teachercache.format.bits import fill_unused, get_header_varint, get_varint, take_unused
from teachercache.format.codec2 import check_hit_bitmap
from teachercache.format.codec3 import (ESCAPE_ID, ESCAPE_TOKEN, GROUP_SIZE, N_CANDIDATES, ONE_BYTE_RANKS, TABLE_SIZE,
                                        TOKEN_FIRST, TOKEN_SECOND, batch_stream, lookup_contexts, record_contexts)
from teachercache.format.quantizer import logprob_table
from teachercache.format.references import context_tables
from teachercache.format.streams import OK, STATUS_TEXT, TargetStreams, check_decode_inputs

@numba.njit(nogil=True, cache=True, inline="always")
def _selected_candidate(s, p, pair_latest, token_latest, prev_same_token, prev_same_pair, cands):
    """candidate_position(s, ...) for the decoder: all eight computed and the selected one taken, without a
    branch on ``s`` (selectors vary from position to position, so branches on them mispredict).
    ``prev_same_*`` have one more slot than positions, holding -1, so that -1 indexes it."""
    cands[0] = pair_latest
    cands[1] = token_latest
    cands[2] = prev_same_token[np.uint64(cands[1] if cands[1] >= 0 else len(prev_same_token) - 1)]
    cands[3] = prev_same_token[np.uint64(cands[2] if cands[2] >= 0 else len(prev_same_token) - 1)]
    cands[4] = prev_same_token[np.uint64(cands[3] if cands[3] >= 0 else len(prev_same_token) - 1)]
    cands[5] = p - 1
    cands[6] = p - 2 if p >= 2 else -1
    cands[7] = prev_same_pair[np.uint64(pair_latest if pair_latest >= 0 else len(prev_same_pair) - 1)]
    return cands[np.uint64(s)]


@numba.njit(nogil=True, cache=True)
def _value_segments(vals, n_groups, seg_pos, seg_end):
    """Read the header of target_values: fills each group's token bytes [start, end) and returns where the
    escaped deltas start, or -32 / -40 (the status, negated) if the header is malformed or the wrong size."""
    count, v = get_header_varint(vals, 0, len(vals))
    if v < 0:
        return -32
    if count != n_groups:
        return -40
    lengths = np.empty(n_groups, np.int64)
    for g in range(n_groups):
        lengths[g], v = get_header_varint(vals, v, len(vals))
        if v < 0:
            return -32
    for g in range(n_groups):
        seg_pos[g] = v
        if lengths[g] > len(vals) - v:
            return -32
        v += lengths[g]
        seg_end[g] = v
    return v


@numba.njit(nogil=True, cache=True)
def _id_layout(ids, id_bytes, table):
    """Read target_ids' header and table: returns (n_miss, n_table, n_ext, n_esc, first plane start), the
    table's ids decoded into ``table``; n_miss = -1 if the header or the lengths do not add up."""
    counts = np.zeros(4, np.int64)
    pos = 0
    for i in range(4):
        counts[i], pos = get_header_varint(ids, pos, len(ids))
        if pos < 0:
            return -1, 0, 0, 0, 0
    n_miss, n_table, n_ext, n_esc = counts[0], counts[1], counts[2], counts[3]
    if n_table > TABLE_SIZE or n_ext > n_miss or n_esc > n_miss:
        return -1, 0, 0, 0, 0
    if (n_table + n_esc) * id_bytes + n_miss + n_ext != len(ids) - pos:
        return -1, 0, 0, 0, 0
    for k in range(n_table):
        t = np.int64(0)
        for q in range(id_bytes):
            t |= np.int64(ids[pos + q * n_table + k]) << (8 * q)
        table[k] = t
    return n_miss, n_table, n_ext, n_esc, pos + n_table * id_bytes


@numba.njit(nogil=True, cache=True, inline="always")
def _escaped_symbol(ids, esc_start, n_esc, i, id_bytes):
    """The i-th escaped symbol of the id stream's escape planes."""
    sym = np.int64(ids[esc_start + i])
    for q in range(1, id_bytes):
        sym |= np.int64(ids[esc_start + q * n_esc + i]) << (8 * q)
    return sym


@numba.njit(nogil=True, cache=True)
def _decode_kernel(sizes, target_offsets, n_groups, cur_tok, prev_tok, ids, vals, hits, refs, cnts, has_counts, lut,
                   id_bytes, vocab_size, out_ids, out_lp, out_counts, unused, seg_pos, seg_end, table,
                   last_by_token, pair_keys, pair_pos, prev_same_token, prev_same_pair, cands):
    """Positions in order; per entry its value (a pair token's second delta, or the next token of its group's
    segment), hit bit, then a rank into the selected reference or a miss symbol. Returns (status, position).
    Like codec2's kernel, the position and entry loops stay in one function."""
    P = len(sizes)
    E = target_offsets[P]
    max_code = len(lut) - 1
    if len(refs) < P:
        return 31, 0
    status = check_hit_bitmap(hits, 0, len(hits), E)
    if status != OK:
        return status, 0
    n_vals = len(vals)
    esc_v = _value_segments(vals, n_groups, seg_pos, seg_end)
    if esc_v < 0:
        return -esc_v, 0
    n_miss, n_table, n_ext, n_esc, first_start = _id_layout(ids, id_bytes, table)
    if n_miss < 0:
        return 36, 0
    ext_start = first_start + n_miss
    esc_start = ext_start + n_ext
    last = len(ids) - 1  # clamps the reads that a selected-away branch makes
    miss = ext = esc = 0
    rp = np.int64(P)
    cp = np.int64(0)
    for p in range(P):
        cur, prev = cur_tok[p], prev_tok[p]
        if cur < 0 or cur >= vocab_size or prev < -1 or prev >= vocab_size:
            return 6, p
        pair_latest, token_latest, slot, key = lookup_contexts(cur, prev, last_by_token, pair_keys, pair_pos)
        s = np.int64(refs[p])
        if s >= N_CANDIDATES:
            return 30, p
        r = _selected_candidate(s, p, pair_latest, token_latest, prev_same_token, prev_same_pair, cands)
        r_start = target_offsets[r] if r >= 0 else 0
        r_n = target_offsets[r + 1] - r_start if r >= 0 else 0
        fill_unused(unused, r_n)
        n_words = (r_n + 63) >> 6
        e0 = target_offsets[p]
        n = np.int64(sizes[p])
        c = np.int64(0)
        prev_id = np.int64(-1)
        er = e0  # the entry's bit in the hit bitmap, read a byte per 8 entries
        hbits = np.int64(hits[er >> 3]) >> (er & 7) if er & 7 else np.int64(0)
        for g in range((n + GROUP_SIZE - 1) // GROUP_SIZE):  # each group's tokens from its own segment
            vp, v_end = seg_pos[g], seg_end[g]
            pend = np.int64(-1)
            for j in range(g * GROUP_SIZE, min(n, (g + 1) * GROUP_SIZE)):
                if pend >= 0:  # the second delta of the last pair token
                    d, pend = pend, np.int64(-1)
                else:
                    if vp >= v_end:
                        return 33, p
                    tok = np.int64(vals[np.uint64(vp)])
                    vp += 1
                    d, pend = np.int64(TOKEN_FIRST[tok]), np.int64(TOKEN_SECOND[tok])
                    if tok == ESCAPE_TOKEN:
                        d, esc_v = get_varint(vals, esc_v, n_vals)
                        if esc_v < 0:
                            return 35, p
                c += d  # the first entry's delta is its code
                if c > max_code:
                    return 14, p
                e = e0 + j
                if er & 7 == 0:
                    hbits = np.int64(hits[np.uint64(er >> 3)])
                hit = hbits & 1
                hbits >>= 1
                er += 1
                if hit:  # the id of this rank among the reference's unused ids
                    if r < 0:
                        return 23, p
                    rank = np.int64(refs[np.uint64(rp)]) if rp < len(refs) else np.int64(0x80)
                    if rank < 0x80:
                        rp += 1
                    else:
                        rank, rp = get_varint(refs, rp, len(refs))
                        if rp < 0:
                            return 13, p
                    m = take_unused(unused, n_words, rank)
                    if m < 0:
                        return 19, p
                    t = np.int64(out_ids[np.uint64(r_start + m)])
                else:  # a table rank of one or two bytes (a select, not a branch: both are common), or an escape
                    if miss >= n_miss:
                        return 38, p
                    b = np.int64(ids[np.uint64(first_start + miss)])
                    miss += 1
                    if b == ESCAPE_ID:
                        if esc >= n_esc:
                            return 38, p
                        t = _escaped_symbol(ids, esc_start, n_esc, esc, id_bytes)
                        esc += 1
                        if j > 0 and d == 0:  # a tie's escape is the gap after the previous id
                            t += prev_id + 1
                    else:
                        second = np.int64(ids[np.uint64(min(ext_start + ext, last))])
                        two = b >= ONE_BYTE_RANKS
                        b = ONE_BYTE_RANKS + ((b - ONE_BYTE_RANKS) << 8) + second if two else b
                        ext += two
                        if b >= n_table:
                            return 37, p
                        t = table[np.uint64(b)]
                    if t >= vocab_size:
                        return 18, p
                out_ids[np.uint64(e)] = t
                out_lp[np.uint64(e)] = lut[np.uint64(c)]
                prev_id = t
            if pend >= 0:
                return 34, p
            seg_pos[g] = vp
        if has_counts:
            for j in range(n):
                cnt, cp = get_varint(cnts, cp, len(cnts))
                if cp < 0:
                    return 16, p
                out_counts[e0 + j] = cnt + 1
        record_contexts(p, cur, slot, key, pair_latest, last_by_token, pair_keys, pair_pos, prev_same_token,
                        prev_same_pair)
    return _decode_leftovers(miss, n_miss, ext, n_ext, esc, n_esc, seg_pos, seg_end, esc_v, n_vals, rp,
                             len(refs), cp, len(cnts), P)


@numba.njit(nogil=True, cache=True)
def _decode_leftovers(miss, n_miss, ext, n_ext, esc, n_esc, seg_pos, seg_end, esc_v, n_vals, rp, n_refs, cp, n_cnts,
                      P):
    """(status, position) after the last position: every stream read to its end."""
    if miss != n_miss or ext != n_ext or esc != n_esc:
        return 38, P - 1
    for g in range(len(seg_pos)):
        if seg_pos[g] != seg_end[g]:
            return 34, P - 1
    if esc_v != n_vals:
        return 35, P - 1
    if rp != n_refs or cp != n_cnts:
        return 17, P - 1
    return OK, -1


def decode_targets(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout,
                   where: str = "<batch>"):
    """Decode a record batch's version 3 streams back to CSR: (target_offsets, ids int32, logprobs float32,
    counts int32 | None), entries of each position in canonical order."""
    sizes, row_positions, cur, prev, target_offsets, pairs = check_decode_inputs(sizes, row_positions, contexts,
                                                                                 streams, where)
    streams = [batch_stream(offsets, stream) for offsets, stream in pairs]
    for name, stream in zip(TargetStreams.STREAMS, streams):
        if stream is None:
            raise CacheCorruptError(where, f"target_{name}: bytes in a row after the first (a version 3 stream is "
                                    "the record batch's first row)", "the shard is damaged; run `teachercache "
                                    "verify` and rebuild it")
    ids, vals, hits, refs, cnts = streams
    n, P = int(target_offsets[-1]), len(sizes)
    out_ids = np.empty(n, np.int32)
    out_lp = np.empty(n, np.float32)
    out_counts = np.empty(n if layout.sampled else 0, np.int32)
    if P == 0:
        if any(len(x) for x in (ids, vals, hits, refs, cnts)):
            raise CacheCorruptError(where, STATUS_TEXT[39], "the shard is damaged; run `teachercache verify` and "
                                    "rebuild it")
        return target_offsets, out_ids, out_lp, (out_counts if layout.sampled else None)
    max_size = int(sizes.max())
    n_groups = (max_size + GROUP_SIZE - 1) // GROUP_SIZE
    status, at = _decode_kernel(
        sizes, target_offsets, n_groups, cur, prev, ids, vals, hits, refs, cnts, layout.sampled,
        logprob_table(layout.quantizer), layout.id_bytes, layout.vocab_size, out_ids, out_lp, out_counts,
        np.zeros((max_size + 63) // 64 + 1, np.uint64), np.zeros(n_groups, np.int64), np.zeros(n_groups, np.int64),
        np.zeros(TABLE_SIZE, np.int32), *context_tables(layout.vocab_size, P),
        np.full(P + 1, -1, np.int64), np.full(P + 1, -1, np.int64), np.empty(N_CANDIDATES, np.int64))
    if status != OK:
        raise CacheCorruptError(where, f"target position {at} of the batch: {STATUS_TEXT[status]}",
                                "the shard is damaged; run `teachercache verify` and rebuild it")
    return target_offsets, out_ids, out_lp, (out_counts if layout.sampled else None)
