"""Encode and decode the sparse targets of a cache (format v1; docs/FORMAT.md has the byte layout).

Per target position the stored entries (id, log-prob[, draw count]) are ordered by ascending code of
-log p (so descending probability), ties by ascending id, and written as three byte streams per row:

* values: the quantised code of the first entry, then the (non-negative) code difference to the previous
  entry, each as an unsigned LEB128 varint (7 bits per byte, high bit = more bytes follow);
* ids: one symbol per entry; the symbol is the id itself, except when the entry's code equals the
  previous entry's code (a tie), where it is the gap ``id - previous_id - 1`` (ids of a tie ascend). The
  symbols are cut into ``layout.id_bytes`` little-endian byte planes stored plane after plane, so the
  high bytes (mostly small) and the low bytes compress separately;
* counts (sampled targets only): ``count - 1`` as a varint per entry.

Arrow's IPC zstd compression of each column buffer then does the entropy coding (tools/bench_codec.py
measured it against zstandard frames). The kernels are numba ``nogil`` functions, serial on purpose:
callers get parallelism by decoding different batches in threads (the build's writer threads) or in
DataLoader worker processes, which sidesteps numba's threading layers and their fork hazards entirely.
Each kernel has a plain Python/numpy reference beside it; tests compare the two byte for byte.

The decoder never trusts a length: every read is checked against the stream's end and every id against
the vocabulary, and a violation comes back as a status code that the caller turns into a
CacheCorruptError naming the file and row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa

from . import schema as S
from .batch import RowBatch
from .errors import CacheCorruptError, CacheFormatError

# Status codes returned by the kernels (0 = fine).
_OK = 0
_STATUS_TEXT = {
    1: "a stored id is outside the vocabulary",
    2: "a position stores the same id twice",
    3: "a log-probability is NaN or positive",
    4: "a position stores more than 65535 ids",
    5: "a draw count is outside [1, 65535]",
    11: "the id stream's length does not match target_sizes",
    12: "the value stream ends early",
    13: "a value varint is malformed",
    14: "a value code is beyond the quantiser's range",
    15: "the value stream has bytes left over",
    16: "the count stream ends early or holds a malformed varint",
    17: "the count stream has bytes left over",
    18: "a decoded id is outside the vocabulary",
}
_MAX_VARINT_BYTES = 3  # codes and counts are < 2**21


@dataclass
class TargetStreams:
    """The encoded per-row byte streams of a batch of rows; offsets are (B+1,) int64 byte offsets."""

    ids: np.ndarray
    id_offsets: np.ndarray
    values: np.ndarray
    value_offsets: np.ndarray
    counts: np.ndarray
    count_offsets: np.ndarray


# ---------------------------------------------------------------------------------------------------
# Quantiser: -log p -> integer code, and the table that maps codes back to log p.


def quantizer_arrays(q: S.Quantizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, steps, bases) as float64/float64/int64 arrays for the kernels; bases[-1] is the max code."""
    return (np.asarray(q.starts, np.float64), np.asarray(q.steps, np.float64),
            np.asarray(q.bases(), np.int64))


@functools.lru_cache(maxsize=16)
def logprob_table(q: S.Quantizer) -> np.ndarray:
    """(max_code + 1,) float32, read-only: the log-prob each code decodes to."""
    starts, steps, bases = quantizer_arrays(q)
    codes = np.arange(bases[-1] + 1)
    piece = np.searchsorted(bases[1:-1], codes, side="right")
    table = (-(starts[piece] + (codes - bases[piece]) * steps[piece])).astype(np.float32)
    table.flags.writeable = False
    return table


def quantize_reference(logprobs: np.ndarray, q: S.Quantizer) -> np.ndarray:
    """Plain numpy reference of the kernels' code of -log p (int64 codes)."""
    starts, steps, bases = quantizer_arrays(q)
    x = np.clip(-np.asarray(logprobs, np.float64), 0.0, q.max_nats)
    piece = np.searchsorted(starts, x, side="right") - 1
    codes = bases[piece] + np.floor((x - starts[piece]) / steps[piece] + 0.5).astype(np.int64)
    return np.minimum(codes, bases[-1])


@numba.njit(nogil=True, cache=True, inline="always")
def _code_of(lp, starts, steps, bases, max_nats):
    x = -np.float64(lp)
    if x < 0.0:
        x = 0.0
    if x > max_nats:
        x = max_nats
    i = len(starts) - 1
    while starts[i] > x:
        i -= 1
    c = bases[i] + np.int64(np.floor((x - starts[i]) / steps[i] + 0.5))
    return min(c, bases[-1])


# ---------------------------------------------------------------------------------------------------
# Varints (unsigned LEB128).


@numba.njit(nogil=True, cache=True, inline="always")
def _put_varint(out, pos, value):
    while value >= 0x80:
        out[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


def _varint_reference(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---------------------------------------------------------------------------------------------------
# Encode.


@numba.njit(nogil=True, cache=True)
def _encode_kernel(row_positions, target_offsets, ids, logprobs, counts, has_counts,
                   starts, steps, bases, max_nats, id_bytes, vocab_size,
                   id_out, val_out, val_offsets, cnt_out, cnt_offsets, stamp):
    vpos = 0
    cpos = 0
    for b in range(len(row_positions) - 1):
        p0, p1 = row_positions[b], row_positions[b + 1]
        e0 = target_offsets[p0]
        n_row = target_offsets[p1] - e0
        k = 0  # entry index within the row
        for p in range(p0, p1):
            a, n = target_offsets[p], target_offsets[p + 1] - target_offsets[p]
            if n > 65535:
                return 4, p
            keys = np.empty(n, np.int64)
            for j in range(n):
                t = ids[a + j]
                if t < 0 or t >= vocab_size:
                    return 1, p
                if stamp[t] == p + 1:
                    return 2, p
                stamp[t] = p + 1
                lp = logprobs[a + j]
                if not lp <= 1e-4:  # also catches NaN
                    return 3, p
                c = _code_of(lp, starts, steps, bases, max_nats)
                keys[j] = (c << 40) | (np.int64(t) << 16) | j
            keys.sort()
            prev_c = -1
            prev_id = -1
            for j in range(n):
                c = keys[j] >> 40
                t = (keys[j] >> 16) & 0xFFFFFF
                src = keys[j] & 0xFFFF
                vpos = _put_varint(val_out, vpos, c if j == 0 else c - prev_c)
                sym = t - prev_id - 1 if (j > 0 and c == prev_c) else t
                base = e0 * id_bytes + k
                for q in range(id_bytes):
                    id_out[base + q * n_row] = (sym >> (8 * q)) & 0xFF
                if has_counts:
                    cnt = counts[a + src]
                    if cnt < 1 or cnt > 65535:
                        return 5, p
                    cpos = _put_varint(cnt_out, cpos, cnt - 1)
                prev_c = c
                prev_id = t
                k += 1
        val_offsets[b + 1] = vpos
        cnt_offsets[b + 1] = cpos
    return _OK, -1


def encode_targets(row_positions, target_offsets, ids, logprobs, counts, layout: S.Layout,
                   where: str = "<batch>") -> TargetStreams:
    """Encode the CSR targets of a batch of rows into per-row byte streams (numba kernel)."""
    row_positions = np.ascontiguousarray(row_positions, np.int64)
    target_offsets = np.ascontiguousarray(target_offsets, np.int64)
    ids = np.ascontiguousarray(ids, np.int64)
    logprobs = np.ascontiguousarray(logprobs, np.float32)
    has_counts = counts is not None
    counts = np.ascontiguousarray(counts if has_counts else np.zeros(0), np.int64)
    if layout.sampled != has_counts:
        raise CacheFormatError(where, f"{S.TARGET_COUNTS}: the layout says sampled={layout.sampled} "
                               f"but counts were {'given' if has_counts else 'not given'}")
    n_entries = len(ids)
    starts, steps, bases = quantizer_arrays(layout.quantizer)
    id_out = np.empty(n_entries * layout.id_bytes, np.uint8)
    val_out = np.empty(n_entries * _MAX_VARINT_BYTES, np.uint8)
    cnt_out = np.empty(n_entries * _MAX_VARINT_BYTES if has_counts else 0, np.uint8)
    val_offsets = np.zeros(len(row_positions), np.int64)
    cnt_offsets = np.zeros(len(row_positions), np.int64)
    stamp = np.zeros(layout.vocab_size, np.int32)
    status, at = _encode_kernel(row_positions, target_offsets, ids, logprobs, counts, has_counts,
                                starts, steps, bases, float(layout.quantizer.max_nats),
                                layout.id_bytes, layout.vocab_size,
                                id_out, val_out, val_offsets, cnt_out, cnt_offsets, stamp)
    if status != _OK:
        raise CacheFormatError(where, f"target position {at}: {_STATUS_TEXT[status]}")
    return TargetStreams(ids=id_out, id_offsets=target_offsets[row_positions] * layout.id_bytes,
                         values=val_out[:val_offsets[-1]], value_offsets=val_offsets,
                         counts=cnt_out[:cnt_offsets[-1]], count_offsets=cnt_offsets)


def encode_targets_reference(row_positions, target_offsets, ids, logprobs, counts,
                             layout: S.Layout) -> TargetStreams:
    """Plain Python/numpy reference of encode_targets (same bytes; no input checks)."""
    codes_all = quantize_reference(logprobs, layout.quantizer)
    id_parts, val_parts, cnt_parts = [], [], []
    id_off, val_off, cnt_off = [0], [0], [0]
    for b in range(len(row_positions) - 1):
        row_syms, row_vals, row_cnts = [], bytearray(), bytearray()
        for p in range(row_positions[b], row_positions[b + 1]):
            a, z = target_offsets[p], target_offsets[p + 1]
            order = np.lexsort((ids[a:z], codes_all[a:z]))  # by code, then id
            prev_c = prev_id = None
            for j in order:
                c, t = int(codes_all[a + j]), int(ids[a + j])
                row_vals += _varint_reference(c if prev_c is None else c - prev_c)
                row_syms.append(t - prev_id - 1 if prev_c == c else t)
                if counts is not None:
                    row_cnts += _varint_reference(int(counts[a + j]) - 1)
                prev_c, prev_id = c, t
        syms = np.asarray(row_syms, np.int64)
        planes = [((syms >> (8 * q)) & 0xFF).astype(np.uint8) for q in range(layout.id_bytes)]
        id_parts.append(np.concatenate(planes) if planes else np.zeros(0, np.uint8))
        val_parts.append(np.frombuffer(bytes(row_vals), np.uint8))
        cnt_parts.append(np.frombuffer(bytes(row_cnts), np.uint8))
        for parts, offs in ((id_parts, id_off), (val_parts, val_off), (cnt_parts, cnt_off)):
            offs.append(offs[-1] + len(parts[-1]))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.uint8)  # noqa: E731
    return TargetStreams(cat(id_parts), np.asarray(id_off, np.int64), cat(val_parts),
                         np.asarray(val_off, np.int64), cat(cnt_parts), np.asarray(cnt_off, np.int64))


# ---------------------------------------------------------------------------------------------------
# Decode.


@numba.njit(nogil=True, cache=True, inline="always")
def _get_varint(buf, pos, end):
    """Returns (value, new_pos); new_pos = -1 if the varint runs past ``end`` or is too long."""
    value = np.int64(0)
    for i in range(_MAX_VARINT_BYTES):
        if pos >= end:
            return value, -1
        byte = np.int64(buf[pos])
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos
    return value, -1


@numba.njit(nogil=True, cache=True)
def _decode_kernel(sizes, row_positions, id_stream, id_offsets, val_stream, val_offsets,
                   cnt_stream, cnt_offsets, has_counts, lut, id_bytes, vocab_size,
                   out_ids, out_lp, out_counts, codes):
    """Three simple passes per row (the second and third vectorise): varints -> codes (a tie is stored
    as -code-1), byte planes -> id symbols, then ties -> ids and codes -> log-probs."""
    max_code = len(lut) - 1
    e0 = 0
    for b in range(len(row_positions) - 1):
        p0, p1 = row_positions[b], row_positions[b + 1]
        n_row = 0
        for p in range(p0, p1):
            n_row += np.int64(sizes[p])
        ib = id_offsets[b]
        if id_offsets[b + 1] - ib != n_row * id_bytes:
            return 11, b
        # pass 1: the value (and count) varints
        v, v_end = val_offsets[b], val_offsets[b + 1]
        cp, c_end = cnt_offsets[b], cnt_offsets[b + 1]
        k = 0
        for p in range(p0, p1):
            c = np.int64(0)
            for j in range(np.int64(sizes[p])):
                if v >= v_end:
                    return 12, b
                d = np.int64(val_stream[v])
                if d < 0x80:  # the common one-byte varint
                    v += 1
                else:
                    d, v = _get_varint(val_stream, v, v_end)
                    if v < 0:
                        return 13, b
                c += d
                if c > max_code:
                    return 14, b
                codes[k] = -c - 1 if (j > 0 and d == 0) else c
                if has_counts:
                    cnt, cp = _get_varint(cnt_stream, cp, c_end)
                    if cp < 0:
                        return 16, b
                    out_counts[e0 + k] = cnt + 1
                k += 1
        if v != v_end:
            return 15, b
        if has_counts and cp != c_end:
            return 17, b
        # pass 2: id symbols from the little-endian byte planes
        ids = out_ids[e0:e0 + n_row]
        if id_bytes == 1:
            for i in range(n_row):
                ids[i] = id_stream[ib + i]
        elif id_bytes == 2:
            for i in range(n_row):
                ids[i] = np.int32(id_stream[ib + i]) | (np.int32(id_stream[ib + n_row + i]) << 8)
        else:
            for i in range(n_row):
                ids[i] = (np.int32(id_stream[ib + i]) | (np.int32(id_stream[ib + n_row + i]) << 8)
                          | (np.int32(id_stream[ib + 2 * n_row + i]) << 16))
        # pass 3: a tie's symbol is the gap after the previous id; codes -> log-probs
        lps = out_lp[e0:e0 + n_row]
        bad = False
        for i in range(n_row):
            c = codes[i]
            if c < 0:
                c = -c - 1
                ids[i] = ids[i - 1] + 1 + ids[i]
            bad |= ids[i] >= vocab_size
            lps[i] = lut[c]
        if bad:
            return 18, b
        e0 += n_row
    return _OK, -1


def decode_targets(sizes, row_positions, streams: TargetStreams, layout: S.Layout,
                   where: str = "<batch>"):
    """Decode per-row streams back to CSR: (target_offsets, ids int32, logprobs float32, counts|None)."""
    sizes = np.ascontiguousarray(sizes, np.uint16)
    target_offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=target_offsets[1:])
    n = int(target_offsets[-1])
    out_ids = np.empty(n, np.int32)
    out_lp = np.empty(n, np.float32)
    out_counts = np.empty(n if layout.sampled else 0, np.int32)
    row_positions = np.ascontiguousarray(row_positions, np.int64)
    pairs = [(np.asarray(o), s) for o, s in ((streams.id_offsets, streams.ids),
                                             (streams.value_offsets, streams.values),
                                             (streams.count_offsets, streams.counts))]
    if (len(row_positions) == 0 or row_positions[0] != 0 or row_positions[-1] != len(sizes)
            or (np.diff(row_positions) < 0).any()
            or any(len(o) != len(row_positions) or o[0] < 0 or o[-1] > len(s) or (np.diff(o) < 0).any()
                   for o, s in pairs)):
        raise CacheCorruptError(where, "per-row offsets of the target streams are inconsistent")
    row_entries = np.diff(target_offsets[row_positions])
    codes = np.empty(int(row_entries.max(initial=0)), np.int32)
    status, row = _decode_kernel(
        sizes, row_positions, streams.ids, np.ascontiguousarray(streams.id_offsets, np.int64),
        streams.values, np.ascontiguousarray(streams.value_offsets, np.int64), streams.counts,
        np.ascontiguousarray(streams.count_offsets, np.int64), layout.sampled,
        logprob_table(layout.quantizer), layout.id_bytes, layout.vocab_size, out_ids, out_lp, out_counts, codes)
    if status != _OK:
        raise CacheCorruptError(where, f"row {row} of the batch: {_STATUS_TEXT[status]}",
                                "the shard is damaged; run `teachercache verify` and rebuild it")
    return target_offsets, out_ids, out_lp, (out_counts if layout.sampled else None)


def decode_targets_reference(sizes, row_positions, streams: TargetStreams, layout: S.Layout):
    """Plain Python reference of decode_targets for well-formed streams (no bounds checks)."""
    lut = logprob_table(layout.quantizer)
    ids, lps, counts = [], [], []
    for b in range(len(row_positions) - 1):
        row_sizes = [int(s) for s in sizes[row_positions[b]:row_positions[b + 1]]]
        n_row = sum(row_sizes)
        planes = streams.ids[streams.id_offsets[b]:streams.id_offsets[b + 1]].astype(np.int64)
        syms = sum(planes[q * n_row:(q + 1) * n_row] << (8 * q) for q in range(layout.id_bytes))
        vals = bytes(streams.values[streams.value_offsets[b]:streams.value_offsets[b + 1]])
        cnts = bytes(streams.counts[streams.count_offsets[b]:streams.count_offsets[b + 1]])
        deltas, cnt_values = _read_varints(vals), _read_varints(cnts)
        k = 0
        for size in row_sizes:
            c = prev_id = None
            for j in range(size):
                d = deltas[k]
                c = d if j == 0 else c + d
                t = prev_id + 1 + int(syms[k]) if (j > 0 and d == 0) else int(syms[k])
                ids.append(t)
                lps.append(lut[c])
                if layout.sampled:
                    counts.append(cnt_values[k] + 1)
                prev_id = t
                k += 1
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
    return (offsets, np.asarray(ids, np.int32), np.asarray(lps, np.float32),
            np.asarray(counts, np.int32) if layout.sampled else None)


def _read_varints(data: bytes) -> list[int]:
    out, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            out.append(value)
            value, shift = 0, 0
    return out


# ---------------------------------------------------------------------------------------------------
# Small fixed-point codes of the per-position columns, and 16-bit floats of hidden states.


def encode_nats16(values: np.ndarray, name: str, where: str) -> np.ndarray:
    """Non-negative nats (entropy, -log p) -> uint16 codes of 1/NATS16_SCALE nats, clipped at NATS16_MAX."""
    values = np.asarray(values, np.float64)
    if np.isnan(values).any():
        raise CacheFormatError(where, f"{name}: NaN values")
    return np.round(np.clip(values, 0.0, S.NATS16_MAX) * S.NATS16_SCALE).astype(np.uint16)


def encode_rest(rest: np.ndarray, where: str) -> np.ndarray:
    rest = np.asarray(rest, np.float64)
    if np.isnan(rest).any():
        raise CacheFormatError(where, f"{S.REST_MASS}: NaN values")
    return np.round(np.clip(rest, 0.0, 1.0) * S.REST_SCALE).astype(np.uint16)


def encode_float16(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> raw bits of bfloat16 (round to nearest even) or float16, as uint16."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    rounded[nan] = (bits[nan] >> 16) | 0x40  # keep NaN a NaN
    return rounded.astype(np.uint16)


def decode_float16(bits: np.ndarray, dtype: str) -> np.ndarray:
    bits = np.ascontiguousarray(bits, np.uint16)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# RowBatch <-> Arrow record batch.


def positions_of_rows(target_mask: np.ndarray, row_offsets: np.ndarray) -> np.ndarray:
    """(B+1,) int64 offsets of each row's target positions, from the per-token mask."""
    masked_before = np.concatenate([[0], np.cumsum(target_mask, dtype=np.int64)])
    return masked_before[np.asarray(row_offsets, np.int64)]


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType, where: str) -> pa.Array:
    if len(values) >= 2**31:
        raise CacheFormatError(where, f"a record batch holds {len(values)} values in one column; "
                               "write fewer rows per batch")
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, np.int32)),
                                    pa.array(values, type=value_type))


def encode_batch(batch: RowBatch, layout: S.Layout, where: str = "<batch>") -> pa.RecordBatch:
    """Encode a RowBatch into one Arrow record batch of the layout's schema."""
    row_offsets = np.asarray(batch.row_offsets, np.int64)
    mask = np.asarray(batch.target_mask, bool)
    if len(batch.input_ids) != row_offsets[-1] or len(mask) != row_offsets[-1]:
        raise CacheFormatError(where, f"{S.INPUT_IDS}/{S.TARGET_MASK}: lengths {len(batch.input_ids)}/"
                               f"{len(mask)} do not match row_offsets[-1] = {row_offsets[-1]}")
    row_positions = positions_of_rows(mask, row_offsets)
    n_pos = int(row_positions[-1])
    per_position = {S.LABEL_LOGPROB: batch.label_logprob, S.REST_MASS: batch.rest_mass,
                    S.ENTROPY: batch.entropy}
    for name, arr in per_position.items():
        if arr is None or len(arr) != n_pos:
            raise CacheFormatError(where, f"{name}: expected {n_pos} values (one per target position), "
                                   f"got {None if arr is None else len(arr)}")
    if len(batch.target_offsets) != n_pos + 1:
        raise CacheFormatError(where, f"target_offsets: expected {n_pos + 1} offsets, "
                               f"got {len(batch.target_offsets)}")
    streams = encode_targets(row_positions, batch.target_offsets, batch.target_ids,
                             batch.target_logprobs, batch.target_counts, layout, where)
    sizes = np.diff(np.asarray(batch.target_offsets, np.int64)).astype(np.uint16)
    columns = {
        S.INPUT_IDS: _list_array(row_offsets, np.asarray(batch.input_ids, np.int32), pa.int32(), where),
        S.TARGET_MASK: _list_array(row_offsets, mask, pa.bool_(), where),
        S.TARGET_SIZES: _list_array(row_positions, sizes, pa.uint16(), where),
        S.LABEL_LOGPROB: _list_array(row_positions, encode_nats16(-np.asarray(batch.label_logprob),
                                                                  S.LABEL_LOGPROB, where), pa.uint16(), where),
        S.REST_MASS: _list_array(row_positions, encode_rest(batch.rest_mass, where), pa.uint16(), where),
        S.ENTROPY: _list_array(row_positions, encode_nats16(batch.entropy, S.ENTROPY, where),
                               pa.uint16(), where),
        S.TARGET_IDS: _list_array(streams.id_offsets, streams.ids, pa.uint8(), where),
        S.TARGET_VALUES: _list_array(streams.value_offsets, streams.values, pa.uint8(), where),
    }
    if layout.sampled:
        columns[S.TARGET_COUNTS] = _list_array(streams.count_offsets, streams.counts, pa.uint8(), where)
    for layer in layout.hidden_layers:
        h = batch.hidden.get(layer)
        if h is None or h.shape != (n_pos, layout.hidden_width):
            raise CacheFormatError(where, f"{S.hidden_column(layer)}: expected shape "
                                   f"({n_pos}, {layout.hidden_width}), got {None if h is None else h.shape}")
        columns[S.hidden_column(layer)] = _list_array(
            row_positions * layout.hidden_width, encode_float16(h, layout.hidden_dtype).reshape(-1),
            pa.uint16(), where)
    return pa.RecordBatch.from_arrays([columns[name] for name in layout.columns()], schema=layout.schema())


def _parts(rb: pa.RecordBatch, name: str, where: str, expect_rows: np.ndarray | None = None):
    """(offsets int64, values numpy) of a list column, checked for sane offsets."""
    col = rb.column(name)
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    if (len(offsets) != rb.num_rows + 1 or (np.diff(offsets) < 0).any() or offsets[0] < 0
            or offsets[-1] > len(values)):
        raise CacheCorruptError(where, f"column {name}: list offsets are inconsistent")
    if expect_rows is not None and not np.array_equal(np.diff(offsets), expect_rows):
        raise CacheCorruptError(where, f"column {name}: per-row lengths disagree with the other columns")
    return offsets, values[offsets[0]:offsets[-1]], offsets - offsets[0]


def decode_batch(rb: pa.RecordBatch, layout: S.Layout, where: str = "<batch>") -> RowBatch:
    """Decode an Arrow record batch (all columns, or any subset of them) into a RowBatch.

    Columns absent from ``rb`` are left as None in the result. Every length is checked against the
    others; a violation raises CacheCorruptError naming ``where``.
    """
    names = set(rb.schema.names)
    out = RowBatch(row_offsets=np.zeros(rb.num_rows + 1, np.int64))
    row_lengths = None
    for name in (S.INPUT_IDS, S.TARGET_MASK):
        if name in names:
            offsets, values, rel = _parts(rb, name, where, row_lengths)
            row_lengths, out.row_offsets = np.diff(offsets), rel
            setattr(out, name, values.astype(np.int32 if name == S.INPUT_IDS else bool, copy=False))
    pos_lengths = None
    if out.target_mask is not None:
        pos_lengths = np.diff(positions_of_rows(out.target_mask, out.row_offsets))
    sizes = None
    for name in (S.TARGET_SIZES, S.LABEL_LOGPROB, S.REST_MASS, S.ENTROPY):
        if name not in names:
            continue
        offsets, values, rel = _parts(rb, name, where, pos_lengths)
        pos_lengths, out.row_positions = np.diff(offsets), rel
        if name == S.TARGET_SIZES:
            sizes = values
        elif name == S.REST_MASS:
            out.rest_mass = (values / np.float32(S.REST_SCALE)).astype(np.float32)
        else:
            nats = (values / np.float32(S.NATS16_SCALE)).astype(np.float32)
            setattr(out, name, -nats if name == S.LABEL_LOGPROB else nats)
    if sizes is not None and S.TARGET_IDS in names and S.TARGET_VALUES in names:
        streams = record_streams(rb, layout, where)
        out.target_offsets, out.target_ids, out.target_logprobs, out.target_counts = decode_targets(
            sizes, out.row_positions, streams, layout, where)
    elif sizes is not None:
        out.target_offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    for layer in layout.hidden_layers:
        name = S.hidden_column(layer)
        if name in names:
            width = layout.hidden_width
            expect = None if pos_lengths is None else pos_lengths * width
            _, values, _ = _parts(rb, name, where, expect)
            if len(values) % width:
                raise CacheCorruptError(where, f"column {name}: length is not a multiple of {width}")
            out.hidden[layer] = decode_float16(values, layout.hidden_dtype).reshape(-1, width)
    return out


def record_streams(rb: pa.RecordBatch, layout: S.Layout, where: str = "<batch>") -> TargetStreams:
    """The encoded target streams of a record batch, as numpy views (no decoding)."""
    def stream(name):
        if name not in rb.schema.names:
            raise CacheFormatError(where, f"column {name} is missing")
        _, values, rel = _parts(rb, name, where)
        return np.ascontiguousarray(values, np.uint8), rel

    counts = stream(S.TARGET_COUNTS) if layout.sampled else (np.zeros(0, np.uint8),
                                                             np.zeros(rb.num_rows + 1, np.int64))
    return TargetStreams(*stream(S.TARGET_IDS), *stream(S.TARGET_VALUES), *counts)
