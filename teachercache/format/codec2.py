"""Format version 2 of the target codec: the sparse targets of a record batch as per-row byte streams
(docs/FORMAT.md, "Version 2"). Caches written in version 2 are read with it; new caches are version 3
(teachercache.format.codec3); teachercache.format.codec picks the codec of a layout's version.

Per target position the entries go in canonical order (ascending code of -log p, ties by ascending id)
and become value-code deltas, a hit bitmap with a rank per hit (an id found in the list of the
position's reference position), id symbols for the misses, and draw counts. References reach back
across rows, so a record batch is the unit of decoding. Helpers: teachercache.format.bits (varints,
rank/select), .quantizer (value codes), .references (reference positions).

The kernels are numba ``nogil`` functions, serial on purpose: callers get parallelism by decoding
different batches in threads (the build's writer threads) or DataLoader worker processes, which
sidesteps numba's threading layers and their fork hazards. Each has a plain Python reference beside it,
compared byte for byte by the tests. The decoder never trusts a length: every read is checked against
its stream's end, every index against its list, every id against the vocabulary; a violation is a
status code that the caller turns into a CacheCorruptError.
"""

from __future__ import annotations

import numba
import numpy as np

from teachercache.errors import CacheCorruptError, CacheFormatError
from teachercache.format import schema as S
from teachercache.format.bits import (MAX_VARINT_BYTES, fill_unused, get_varint, put_varint, read_varints, take_rank,
                                      take_unused, varint_reference)
from teachercache.format.quantizer import code_of, logprob_table, quantize_reference, quantizer_arrays
from teachercache.format.references import (context_tables, record_position, record_position_python, reference_position,
                                            reference_position_python)
from teachercache.format.streams import OK as _OK
from teachercache.format.streams import STATUS_TEXT as _STATUS_TEXT
from teachercache.format.streams import TargetStreams, check_decode_inputs, check_encode_inputs

_EMPTY_U8 = np.zeros(0, np.uint8)

# ---------------------------------------------------------------------------------------------------
# Encode.


@numba.njit(nogil=True, cache=True)
def sort_nearly_sorted(keys):
    """Sort in place. A position's entries usually come from the targets pass nearly in canonical order
    already (by probability, best first): an insertion sort, linear in the length plus the number of
    out-of-order pairs, beats a quicksort there several times over. Entries in another order (sampled
    targets come in id order; imported ones in any) hand over to the quicksort after 8 moves per entry."""
    budget = 8 * len(keys)
    for i in range(1, len(keys)):
        key = keys[i]
        j = i - 1
        while j >= 0 and keys[j] > key:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = key
        budget -= i - 1 - j
        if budget < 0:
            keys.sort()
            return


@numba.njit(nogil=True, cache=True, inline="always")
def position_keys(keys, ids, logprobs, a, p, seen, vocab_size, starts, steps, bases, max_nats):
    """Check the entries a, a+1, ... of position p (ids in the vocabulary and distinct, log-probs <= 0)
    and fill ``keys`` with their sort keys: code << 40 | id << 16 | index. Returns a status."""
    for j in range(len(keys)):
        t = ids[a + j]
        if t < 0 or t >= vocab_size:
            return 1
        if seen[t] == p:
            return 2
        seen[t] = p
        lp = logprobs[a + j]
        if not lp <= 1e-4:  # also catches NaN
            return 3
        c = code_of(lp, starts, steps, bases, max_nats)
        keys[j] = (c << 40) | (np.int64(t) << 16) | j
    return _OK


@numba.njit(nogil=True, cache=True, inline="always")
def stamp_reference(r, p, target_offsets, canon, stamp_pos, stamp_idx, unused):
    """Mark the ids of reference position r's list as found from position p (``stamp_pos``), with their
    index in the list (``stamp_idx``), and every entry of the list unused."""
    for i in range(target_offsets[r], target_offsets[r + 1]):
        stamp_pos[canon[i]] = p
        stamp_idx[canon[i]] = i - target_offsets[r]
    fill_unused(unused, target_offsets[r + 1] - target_offsets[r])


@numba.njit(nogil=True, cache=True, inline="always")
def _encode_entries(keys, a, p, r, row_start, counts, has_counts, canon, stamp_pos, stamp_idx, unused,
                    val_out, vpos, hit_out, hb, ref_out, rpos, cnt_out, cpos, row_syms, n_miss):
    """Write position p's sorted entries (``keys``; the first is entry a of the batch): a value varint
    each, a hit bit and rank varint per hit, an id symbol per miss into ``row_syms``, a count varint each.
    Records the canonical list in ``canon``. Returns (status, vpos, rpos, cpos, n_miss)."""
    prev_c = -1
    prev_id = -1
    for j in range(len(keys)):
        c = keys[j] >> 40
        t = (keys[j] >> 16) & 0xFFFFFF
        vpos = put_varint(val_out, vpos, c if j == 0 else c - prev_c)
        if r >= 0 and stamp_pos[t] == p:
            e = a + j - row_start
            hit_out[hb + (e >> 3)] |= np.uint8(1 << (e & 7))
            rpos = put_varint(ref_out, rpos, take_rank(unused, stamp_idx[t]))
        else:
            row_syms[n_miss] = t - prev_id - 1 if (j > 0 and c == prev_c) else t
            n_miss += 1
        if has_counts:
            cnt = counts[a + (keys[j] & 0xFFFF)]
            if cnt < 1 or cnt > 65535:
                return 5, vpos, rpos, cpos, n_miss
            cpos = put_varint(cnt_out, cpos, cnt - 1)
        canon[a + j] = t
        prev_c = c
        prev_id = t
    return _OK, vpos, rpos, cpos, n_miss


@numba.njit(nogil=True, cache=True, inline="always")
def _put_id_planes(id_out, ipos, row_syms, n_miss, id_bytes):
    """A row's miss symbols as ``id_bytes`` little-endian byte planes at id_out[ipos:]; the new end."""
    for q in range(id_bytes):
        for i in range(n_miss):
            id_out[ipos + q * n_miss + i] = (row_syms[i] >> (8 * q)) & 0xFF
    return ipos + id_bytes * n_miss


@numba.njit(nogil=True, cache=True)
def _encode_kernel(row_positions, target_offsets, ids, logprobs, counts, has_counts, cur_tok, prev_tok,
                   starts, steps, bases, max_nats, id_bytes, vocab_size,
                   id_out, id_offsets, val_out, val_offsets, hit_out, hit_offsets, ref_out, ref_offsets,
                   cnt_out, cnt_offsets, canon, row_syms, seen, stamp_pos, stamp_idx, unused,
                   last_by_token, pair_keys, pair_pos):
    """Rows in order, positions in order: check and sort a position's entries, find its reference, write
    its entries; a row's id planes once its misses are known. Returns (status, position).
    ``hit_out`` comes zeroed and ``hit_offsets`` filled in (the bitmap's length follows from the sizes)."""
    vpos = 0
    rpos = 0
    cpos = 0
    ipos = 0
    for b in range(len(row_positions) - 1):
        n_miss = 0
        row_start = target_offsets[row_positions[b]]
        for p in range(row_positions[b], row_positions[b + 1]):
            a, n = target_offsets[p], target_offsets[p + 1] - target_offsets[p]
            if n > 65535:
                return 4, p
            cur, prev = cur_tok[p], prev_tok[p]
            if cur < 0 or cur >= vocab_size or prev < -1 or prev >= vocab_size:
                return 6, p
            keys = np.empty(n, np.int64)
            status = position_keys(keys, ids, logprobs, a, p, seen, vocab_size, starts, steps, bases, max_nats)
            if status != _OK:
                return status, p
            sort_nearly_sorted(keys)
            r, slot, key = reference_position(cur, prev, last_by_token, pair_keys, pair_pos)
            if r >= 0:
                stamp_reference(r, p, target_offsets, canon, stamp_pos, stamp_idx, unused)
            status, vpos, rpos, cpos, n_miss = _encode_entries(
                keys, a, p, r, row_start, counts, has_counts, canon, stamp_pos, stamp_idx, unused,
                val_out, vpos, hit_out, hit_offsets[b], ref_out, rpos, cnt_out, cpos, row_syms, n_miss)
            if status != _OK:
                return status, p
            record_position(p, cur, slot, key, last_by_token, pair_keys, pair_pos)
        ipos = _put_id_planes(id_out, ipos, row_syms, n_miss, id_bytes)
        id_offsets[b + 1] = ipos
        val_offsets[b + 1] = vpos
        ref_offsets[b + 1] = rpos
        cnt_offsets[b + 1] = cpos
    return _OK, -1


def hit_bitmap_offsets(row_positions: np.ndarray, target_offsets: np.ndarray) -> np.ndarray:
    """(B+1,) int64 byte offsets of the rows' hit bitmaps: ceil(entries of the row / 8) bytes each."""
    row_entries = np.diff(np.asarray(target_offsets, np.int64)[np.asarray(row_positions, np.int64)])
    offsets = np.zeros(len(row_entries) + 1, np.int64)
    np.cumsum((row_entries + 7) >> 3, out=offsets[1:])
    return offsets


def encode_targets_v2(row_positions, target_offsets, ids, logprobs, counts, contexts, layout: S.Layout,
                      where: str = "<batch>") -> TargetStreams:
    """Encode the CSR targets of a record batch into version 2's per-row byte streams (numba kernel).

    ``contexts`` is (cur, prev) from references.position_contexts(); ``counts`` is None unless layout.sampled.
    """
    has_counts = counts is not None
    row_positions, target_offsets, ids, logprobs, counts, cur, prev = check_encode_inputs(
        row_positions, target_offsets, ids, logprobs, counts, contexts, layout, where)
    n_pos, n_entries, V = len(target_offsets) - 1, len(ids), layout.vocab_size
    starts, steps, bases = quantizer_arrays(layout.quantizer)
    sizes = np.diff(target_offsets)
    max_size = int(sizes.max(initial=0))
    row_entries = np.diff(target_offsets[row_positions])
    hit_offsets = hit_bitmap_offsets(row_positions, target_offsets)
    outs = dict(id_out=np.empty(n_entries * layout.id_bytes, np.uint8),
                val_out=np.empty(n_entries * MAX_VARINT_BYTES, np.uint8),
                hit_out=np.zeros(int(hit_offsets[-1]), np.uint8),
                ref_out=np.empty(n_entries * MAX_VARINT_BYTES, np.uint8),
                cnt_out=np.empty(n_entries * MAX_VARINT_BYTES if has_counts else 0, np.uint8))
    offs = {name: np.zeros(len(row_positions), np.int64) for name in ("id", "val", "ref", "cnt")}
    status, at = _encode_kernel(
        row_positions, target_offsets, ids, logprobs, counts, has_counts, cur, prev,
        starts, steps, bases, float(layout.quantizer.max_nats), layout.id_bytes, V,
        outs["id_out"], offs["id"], outs["val_out"], offs["val"], outs["hit_out"], hit_offsets,
        outs["ref_out"], offs["ref"], outs["cnt_out"], offs["cnt"], np.empty(n_entries, np.int64),
        np.empty(int(row_entries.max(initial=0)), np.int64), np.full(V, -1, np.int64),
        np.full(V, -1, np.int64), np.zeros(V, np.int64), np.zeros((max_size + 63) // 64 + 1, np.uint64),
        *context_tables(V, n_pos))
    if status != _OK:
        raise CacheFormatError(where, f"target position {at}: {_STATUS_TEXT[status]}")
    return TargetStreams(ids=outs["id_out"][:offs["id"][-1]], id_offsets=offs["id"],
                         values=outs["val_out"][:offs["val"][-1]], value_offsets=offs["val"],
                         hits=outs["hit_out"], hit_offsets=hit_offsets,
                         refs=outs["ref_out"][:offs["ref"][-1]], ref_offsets=offs["ref"],
                         counts=outs["cnt_out"][:offs["cnt"][-1]], count_offsets=offs["cnt"])


def encode_targets_reference_v2(row_positions, target_offsets, ids, logprobs, counts, contexts,
                             layout: S.Layout) -> TargetStreams:
    """Plain Python reference of encode_targets_v2 (the same bytes; no input checks)."""
    codes_all = quantize_reference(logprobs, layout.quantizer)
    cur, prev = contexts
    tables: dict = {}
    canon: dict[int, list[int]] = {}
    streams = {name: [] for name in ("ids", "values", "hits", "refs", "counts")}
    for b in range(len(row_positions) - 1):
        syms, hit_bits, row = [], [], {name: bytearray() for name in ("values", "refs", "counts")}
        for p in range(row_positions[b], row_positions[b + 1]):
            a, z = target_offsets[p], target_offsets[p + 1]
            order = np.lexsort((ids[a:z], codes_all[a:z]))  # by code, then id
            ref = canon.get(reference_position_python(tables, int(cur[p]), int(prev[p])), [])
            unused = list(ref)  # the reference's ids no entry of this position has hit yet, in its order
            prev_c = prev_id = None
            for src in order:
                c, t = int(codes_all[a + src]), int(ids[a + src])
                row["values"] += varint_reference(c if prev_c is None else c - prev_c)
                hit_bits.append(t in unused)
                if t in unused:
                    row["refs"] += varint_reference(unused.index(t))
                    unused.remove(t)
                else:
                    syms.append(t - prev_id - 1 if prev_c == c else t)
                if counts is not None:
                    row["counts"] += varint_reference(int(counts[a + src]) - 1)
                prev_c, prev_id = c, t
            canon[p] = [int(ids[a + src]) for src in order]
            record_position_python(tables, p, int(cur[p]), int(prev[p]))
        syms = np.asarray(syms, np.int64)
        streams["ids"].append(np.concatenate([((syms >> (8 * q)) & 0xFF).astype(np.uint8)
                                              for q in range(layout.id_bytes)]))
        streams["hits"].append(np.packbits(np.asarray(hit_bits, bool), bitorder="little"))
        for name in ("values", "refs", "counts"):
            streams[name].append(np.frombuffer(bytes(row[name]), np.uint8))
    def joined(name):
        parts = streams[name]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in parts])]).astype(np.int64)
        return (np.concatenate(parts) if parts else _EMPTY_U8), offsets

    return TargetStreams(*joined("ids"), *joined("values"), *joined("hits"), *joined("refs"), *joined("counts"))


# ---------------------------------------------------------------------------------------------------
# Decode.


@numba.njit(nogil=True, cache=True, inline="always")
def check_hit_bitmap(hit_stream, hb, hb_end, row_entries):
    """Status of a row's hit bitmap hit_stream[hb:hb_end]: one bit per entry, the padding bits clear."""
    if hb_end - hb != (row_entries + 7) >> 3:
        return 21
    if row_entries & 7 and hit_stream[hb + (row_entries >> 3)] >> (row_entries & 7) != 0:
        return 22
    return _OK


@numba.njit(nogil=True, cache=True, inline="always")
def _decode_counts(cnt_stream, cp, c_end, out_counts, e, n):
    """A position's n draw counts (stored as count - 1) into out_counts[e:e+n]; returns the stream's new
    read position, -1 if it ends early or holds a malformed varint."""
    for j in range(n):
        cnt, cp = get_varint(cnt_stream, cp, c_end)
        if cp < 0:
            return cp
        out_counts[e + j] = cnt + 1
    return cp


@numba.njit(nogil=True, cache=True)
def _decode_kernel(sizes, row_positions, cur_tok, prev_tok, id_stream, id_offsets, val_stream, val_offsets,
                   hit_stream, hit_offsets, ref_stream, ref_offsets, cnt_stream, cnt_offsets, has_counts, lut,
                   id_bytes, vocab_size, target_offsets, out_ids, out_lp, out_counts, unused,
                   last_by_token, pair_keys, pair_pos):
    """Positions in order, entries in one pass: the position's reference comes from the contexts alone,
    so each entry's value varint, hit bit and rank varint or id symbol are read and resolved together.

    The per-entry loads and stores index with np.uint64: numba then drops its negative-index wraparound
    branch (every index here is already checked to lie in range, so it is never negative); 20% faster.
    The position and entry loops stay in this one function on purpose: with the position's entries in an
    inline helper of their own, decoding the demo cache's top-64 batches took 1.16-1.21x as long
    (numba 0.68, measured side by side in one process); the row checks and the counts are helpers."""
    max_code = len(lut) - 1
    for b in range(len(row_positions) - 1):
        ib, n_id_bytes = id_offsets[b], id_offsets[b + 1] - id_offsets[b]
        if n_id_bytes % id_bytes != 0:
            return 11, b
        n_miss = n_id_bytes // id_bytes
        miss = 0
        row_start = target_offsets[row_positions[b]]
        hb = hit_offsets[b]
        status = check_hit_bitmap(hit_stream, hb, hit_offsets[b + 1], target_offsets[row_positions[b + 1]] - row_start)
        if status != _OK:
            return status, b
        v, v_end = val_offsets[b], val_offsets[b + 1]
        rp, r_end = ref_offsets[b], ref_offsets[b + 1]
        cp, c_end = cnt_offsets[b], cnt_offsets[b + 1]
        for p in range(row_positions[b], row_positions[b + 1]):
            cur, prev = cur_tok[p], prev_tok[p]
            if cur < 0 or cur >= vocab_size or prev < -1 or prev >= vocab_size:
                return 6, b
            r, slot, key = reference_position(cur, prev, last_by_token, pair_keys, pair_pos)
            r_start = target_offsets[r] if r >= 0 else 0
            r_n = target_offsets[r + 1] - r_start if r >= 0 else 0
            fill_unused(unused, r_n)
            n_words = (r_n + 63) >> 6
            e = target_offsets[p]
            n = np.int64(sizes[p])
            c = np.int64(0)
            prev_id = np.int64(-1)
            er = e - row_start  # the entry's index in the row, so its bit in the row's hit bitmap
            hbits = np.int64(hit_stream[hb + (er >> 3)]) >> (er & 7) if er & 7 else np.int64(0)
            for j in range(n):
                d = np.int64(val_stream[np.uint64(v)]) if v < v_end else np.int64(0x80)
                if d < 0x80:  # the common one-byte varint
                    v += 1
                else:
                    d, v = get_varint(val_stream, v, v_end)
                    if v < 0:
                        return 13, b
                c += d
                if c > max_code:
                    return 14, b
                if er & 7 == 0:
                    hbits = np.int64(hit_stream[np.uint64(hb + (er >> 3))])
                hit = hbits & 1
                hbits >>= 1
                er += 1
                if hit:  # the id of the given rank among the reference's unused ids
                    if r < 0:
                        return 23, b
                    s = np.int64(ref_stream[np.uint64(rp)]) if rp < r_end else np.int64(0x80)
                    if s < 0x80:
                        rp += 1
                    else:
                        s, rp = get_varint(ref_stream, rp, r_end)
                        if rp < 0:
                            return 13, b
                    m = take_unused(unused, n_words, s)
                    if m < 0:
                        return 19, b
                    t = np.int64(out_ids[np.uint64(r_start + m)])
                else:
                    if miss >= n_miss:
                        return 20, b
                    sym = np.int64(id_stream[np.uint64(ib + miss)])
                    if id_bytes >= 2:
                        sym |= np.int64(id_stream[np.uint64(ib + n_miss + miss)]) << 8
                    if id_bytes >= 3:
                        sym |= np.int64(id_stream[np.uint64(ib + 2 * n_miss + miss)]) << 16
                    miss += 1
                    t = prev_id + 1 + sym if (j > 0 and d == 0) else sym  # a tie stores the id gap
                    if t >= vocab_size:
                        return 18, b
                out_ids[np.uint64(e + j)] = t
                out_lp[np.uint64(e + j)] = lut[np.uint64(c)]
                prev_id = t
            if has_counts:
                cp = _decode_counts(cnt_stream, cp, c_end, out_counts, e, n)
                if cp < 0:
                    return 16, b
            record_position(p, cur, slot, key, last_by_token, pair_keys, pair_pos)
        if miss != n_miss:
            return 20, b
        if v != v_end:
            return 15, b
        if rp != r_end or (has_counts and cp != c_end):
            return 17, b
    return _OK, -1


def decode_targets_v2(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout,
                      where: str = "<batch>"):
    """Decode a record batch's version 2 streams back to CSR: (target_offsets, ids int32, logprobs float32,
    counts int32 | None), entries of each position in canonical order."""
    sizes, row_positions, cur, prev, target_offsets, pairs = check_decode_inputs(sizes, row_positions, contexts,
                                                                                 streams, where)
    n = int(target_offsets[-1])
    out_ids = np.empty(n, np.int32)
    out_lp = np.empty(n, np.float32)
    out_counts = np.empty(n if layout.sampled else 0, np.int32)
    status, row = _decode_kernel(
        sizes, row_positions, cur, prev, *(x for offsets, stream in pairs for x in (stream, offsets)),
        layout.sampled, logprob_table(layout.quantizer), layout.id_bytes, layout.vocab_size, target_offsets,
        out_ids, out_lp, out_counts, np.zeros((int(sizes.max(initial=0)) + 63) // 64 + 1, np.uint64),
        *context_tables(layout.vocab_size, len(sizes)))
    if status != _OK:
        raise CacheCorruptError(where, f"row {row} of the batch: {_STATUS_TEXT[status]}",
                                "the shard is damaged; run `teachercache verify` and rebuild it")
    return target_offsets, out_ids, out_lp, (out_counts if layout.sampled else None)


def decode_targets_reference_v2(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout):
    """Plain Python reference of decode_targets_v2 for well-formed streams (no bounds checks)."""
    lut = logprob_table(layout.quantizer)
    cur, prev = contexts
    tables: dict = {}
    canon: dict[int, list[int]] = {}
    ids, lps, counts = [], [], []
    for b in range(len(row_positions) - 1):
        n_miss = (streams.id_offsets[b + 1] - streams.id_offsets[b]) // layout.id_bytes
        planes = streams.ids[streams.id_offsets[b]:streams.id_offsets[b + 1]].astype(np.int64)
        syms = iter(sum(planes[q * n_miss:(q + 1) * n_miss] << (8 * q) for q in range(layout.id_bytes)))
        row = {name: iter(read_varints(bytes(getattr(streams, name)[
            getattr(streams, off)[b]:getattr(streams, off)[b + 1]])))
            for name, off in (("values", "value_offsets"), ("refs", "ref_offsets"), ("counts", "count_offsets"))}
        hits = iter(np.unpackbits(streams.hits[streams.hit_offsets[b]:streams.hit_offsets[b + 1]],
                                  bitorder="little"))
        for p in range(row_positions[b], row_positions[b + 1]):
            unused = list(canon.get(reference_position_python(tables, int(cur[p]), int(prev[p])), []))
            c = prev_id = None
            canon[p] = []
            for j in range(int(sizes[p])):
                d = next(row["values"])
                c = d if j == 0 else c + d
                if next(hits):
                    t = unused.pop(next(row["refs"]))
                else:
                    sym = int(next(syms))
                    t = prev_id + 1 + sym if (j > 0 and d == 0) else sym
                canon[p].append(t)
                ids.append(t)
                lps.append(lut[c])
                if layout.sampled:
                    counts.append(next(row["counts"]) + 1)
                prev_id = t
            record_position_python(tables, p, int(cur[p]), int(prev[p]))
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
    return (offsets, np.asarray(ids, np.int32), np.asarray(lps, np.float32),
            np.asarray(counts, np.int32) if layout.sampled else None)
