"""Encode and decode the sparse targets of a record batch (format v1; docs/FORMAT.md has the byte layout).

Per target position the stored entries (id, log-prob[, draw count]) are put in *canonical order*: by
ascending code of -log p (descending probability), ties by ascending id. They are written as four byte
streams per row:

* values: the quantised code of the first entry, then each entry's code minus the previous one (never
  negative), as unsigned LEB128 varints (7 bits per byte, high bit = more bytes follow);
* hits and refs: the teacher's top ids repeat whenever the same context comes back, so each position
  has a *reference position*: the latest earlier target position of the same record batch whose context
  (previous token, current token) is the same, or failing that whose current token is the same. An
  entry whose id is in the reference's canonical list is a *hit*, any other entry a *miss*. The hits
  stream is a bitmap with one bit per entry of the row (least significant bit first, 1 = hit, padded
  with zero bits to a whole byte). The refs stream holds one varint per hit: the entry's *rank*, the
  number of entries before it in the reference's list that no earlier entry of the position has hit
  (0 = the first id of the reference still unused). Lists of a repeated context hold nearly the same
  ids in nearly the same order, so ranks are small;
* ids: for misses only, a symbol: the id itself, or, when the entry's code equals the previous entry's
  code (a tie, so ids ascend), the gap ``id - previous_id - 1``. A row's symbols are cut into
  ``layout.id_bytes`` little-endian byte planes stored plane after plane;
* counts (sampled targets only): ``count - 1`` per entry as a varint.

Arrow's IPC zstd compression of each column then does the entropy coding. tools/bench_codec.py measured
these choices against the alternatives (see docs/FORMAT.md). The references make a record batch the unit
of decoding: its positions are decoded in order, from the first.

The kernels are numba ``nogil`` functions, serial on purpose: callers get parallelism by decoding
different batches in threads (the build's writer threads) or in DataLoader worker processes, which
sidesteps numba's threading layers and their fork hazards entirely. Each kernel has a plain Python
reference beside it; tests compare the two byte for byte. The decoder never trusts a length: every read
is checked against its stream's end, every index against its list and every id against the vocabulary;
a violation comes back as a status code that the caller turns into a CacheCorruptError.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from . import schema as S
from .errors import CacheCorruptError, CacheFormatError

_OK = 0
_STATUS_TEXT = {
    1: "a stored id is outside the vocabulary",
    2: "a position stores the same id twice",
    3: "a log-probability is NaN or positive",
    4: "a position stores more than 65535 ids",
    5: "a draw count is outside [1, 65535]",
    6: "a context token is outside the vocabulary",
    11: "the id stream's length is not a whole number of symbols",
    13: "a varint is malformed or runs past its stream",
    14: "a value code is beyond the quantiser's range",
    15: "the value stream has bytes left over",
    16: "the count stream ends early or holds a malformed varint",
    17: "the count or ref stream has bytes left over",
    18: "a decoded id is outside the vocabulary",
    19: "a reference points outside its reference list",
    20: "the id stream holds more or fewer symbols than the row's misses",
    21: "the hit bitmap's length does not match the row's entries",
    22: "the hit bitmap has bits set past the row's last entry",
    23: "an entry is marked a hit but its position has no reference",
}
_MAX_VARINT_BYTES = 3  # codes, counts and ref symbols are all < 2**21
_EMPTY_U8 = np.zeros(0, np.uint8)


@dataclass
class TargetStreams:
    """The encoded per-row byte streams of a record batch; offsets are (B+1,) int64 byte offsets."""

    ids: np.ndarray
    id_offsets: np.ndarray
    values: np.ndarray
    value_offsets: np.ndarray
    hits: np.ndarray
    hit_offsets: np.ndarray
    refs: np.ndarray
    ref_offsets: np.ndarray
    counts: np.ndarray
    count_offsets: np.ndarray

    FIELDS = ("ids", "id_offsets", "values", "value_offsets", "hits", "hit_offsets", "refs", "ref_offsets",
              "counts", "count_offsets")


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
# Varints, ranks among a reference's unused ids, and the context table that finds reference positions.


@numba.njit(nogil=True, cache=True, inline="always")
def _put_varint(out, pos, value):
    while value >= 0x80:
        out[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


@numba.njit(nogil=True, cache=True, inline="always")
def _get_varint(buf, pos, end):
    """(value, new_pos); new_pos = -1 if the varint runs past ``end`` or is longer than 3 bytes."""
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


def _varint_reference(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varints(data: bytes) -> list[int]:
    out, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            out.append(value)
            value, shift = 0, 0
    return out


@intrinsic
def _popcount(typingctx, x):
    """Number of set bits of an unsigned integer (LLVM ctpop: one instruction on current CPUs)."""
    if not isinstance(x, numba.types.Integer):
        return None
    return x(x), lambda context, builder, sig, args: builder.ctpop(args[0])


@intrinsic
def _trailing_zeros(typingctx, x):
    """Index of the lowest set bit of a non-zero unsigned integer (LLVM cttz)."""
    if not isinstance(x, numba.types.Integer):
        return None
    return x(x), lambda context, builder, sig, args: builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))


@numba.njit(nogil=True, cache=True, inline="always")
def _fill_unused(unused, n):
    """Mark entries 0..n-1 of a reference list unused: bit i of word i // 64 set."""
    full = n >> 6
    for w in range(full):
        unused[w] = np.uint64(0xFFFFFFFFFFFFFFFF)
    if n & 63:
        unused[full] = (np.uint64(1) << np.uint64(n & 63)) - np.uint64(1)


@numba.njit(nogil=True, cache=True, inline="always")
def _take_rank(unused, m):
    """The rank of unused entry m (how many unused entries come before it); marks it used."""
    w = m >> 6
    bit = np.uint64(1) << np.uint64(m & 63)
    rank = np.int64(_popcount(unused[w] & (bit - np.uint64(1))))
    for i in range(w):
        rank += np.int64(_popcount(unused[i]))
    unused[w] &= ~bit
    return rank


@intrinsic
def _pdep(typingctx, src, mask):
    """x86 BMI2 parallel bit deposit: the low bits of ``src`` go, in order, to the set bits of ``mask``."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.bmi.pdep.64"), args)
    return numba.types.uint64(numba.types.uint64, numba.types.uint64), codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _select_bit_bmi2(x, rank):
    """Index of the set bit of the given rank (0 = lowest) in x, which has more than ``rank`` set bits:
    deposit a single 1 at the rank-th set bit of x, then count its trailing zeros (two instructions)."""
    return _trailing_zeros(_pdep(np.uint64(1) << np.uint64(rank), x))


_SELECT_IN_BYTE = np.full(256 * 8, 8, np.uint8)
"""_SELECT_IN_BYTE[8 * v + r]: the index of the set bit of rank r in the byte v (8 if v has fewer bits)."""
for _v in range(256):
    _bits = [i for i in range(8) if _v >> i & 1]
    _SELECT_IN_BYTE[8 * _v: 8 * _v + len(_bits)] = _bits
del _v, _bits


@numba.njit(nogil=True, cache=True, inline="always")
def _select_bit_portable(x, rank):
    """_select_bit_bmi2 without BMI2, branch-free (ranks are unpredictable, so a branch or a loop per hit
    would mispredict): the popcount of every byte, summed into running byte totals by one
    multiplication; the bytes whose running total is <= rank, counted by a bytewise compare, say which
    byte holds the bit; a table selects it within that byte."""
    ones = np.uint64(0x0101010101010101)
    highs = np.uint64(0x8080808080808080)
    s = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    s = (s & np.uint64(0x3333333333333333)) + ((s >> np.uint64(2)) & np.uint64(0x3333333333333333))
    totals = ((s + (s >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)) * ones
    r = np.uint64(rank)
    place = _popcount(((r * ones | highs) - totals) & highs) * np.uint64(8)
    before = ((totals << np.uint64(8)) >> place) & np.uint64(0xFF)
    return place + np.uint64(_SELECT_IN_BYTE[((x >> place) & np.uint64(0xFF)) * np.uint64(8) + r - before])


def _target_has_bmi2() -> bool:
    """Whether numba compiles for a CPU with BMI2: the host's, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES
    name another target (a named one without a feature list, e.g. "generic", takes the portable path)."""
    if numba.config.CPU_FEATURES:
        return "+bmi2" in numba.config.CPU_FEATURES.split(",")
    if numba.config.CPU_NAME not in (None, "", "host"):
        return False
    try:  # llvmlite cannot list the features of every host; then take the portable path
        return "+bmi2" in llvmlite.binding.get_host_cpu_features().flatten().split(",")
    except RuntimeError:
        return False


HAS_BMI2 = _target_has_bmi2()
"""Whether the decoder uses the pdep instruction (x86 since 2013) to find a hit's id; elsewhere (ARM,
older x86) a portable select that decodes about 25% fewer positions per second."""
_select_bit = _select_bit_bmi2 if HAS_BMI2 else _select_bit_portable


@numba.njit(nogil=True, cache=True, inline="always")
def _take_unused(unused, n_words, rank):
    """The index of the unused entry of the given rank, marked used; -1 if there are not that many."""
    first = np.int64(_popcount(unused[0]))
    if rank < first:  # the common case, and the only one for lists of up to 64 ids: no loop
        bit = _select_bit(unused[0], rank)
        unused[0] &= ~(np.uint64(1) << bit)
        return np.int64(bit)
    w = 0
    while True:
        if w >= n_words:
            return np.int64(-1)
        c = np.int64(_popcount(unused[w]))
        if rank < c:
            break
        rank -= c
        w += 1
    bit = _select_bit(unused[w], rank)
    unused[w] &= ~(np.uint64(1) << bit)
    return np.int64(w) * 64 + np.int64(bit)


@numba.njit(nogil=True, cache=True, inline="always")
def _pair_slot(keys, key):
    """Slot of ``key`` in an open-addressing table (linear probing; never full: 2x the positions)."""
    mask = len(keys) - 1
    h = ((key * np.int64(-7046029254386353131)) >> 20) & mask
    while keys[h] != -1 and keys[h] != key:
        h = (h + 1) & mask
    return h


@numba.njit(nogil=True, cache=True, inline="always")
def _reference(cur, prev, last_by_token, pair_keys, pair_pos):
    """The reference position of a position with context (prev, cur), or -1; then records this one."""
    key = (prev + 1) * np.int64(1 << 25) + cur
    slot = _pair_slot(pair_keys, key)
    r = pair_pos[slot] if pair_keys[slot] == key else -1
    if r < 0:
        r = last_by_token[cur]
    return r, slot, key


def _context_tables(vocab_size: int, n_positions: int):
    size = 1 << max(4, int(2 * n_positions + 1).bit_length())
    return (np.full(vocab_size, -1, np.int64), np.full(size, -1, np.int64), np.full(size, -1, np.int64))


def _reference_python(tables: dict, cur: int, prev: int) -> int:
    """The reference position by the rule in plain words: latest same (prev, cur), else same cur."""
    return tables.get(("pair", prev, cur), tables.get(("token", cur), -1))


# ---------------------------------------------------------------------------------------------------
# Encode.


@numba.njit(nogil=True, cache=True)
def _sort_nearly_sorted(keys):
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


@numba.njit(nogil=True, cache=True)
def _encode_kernel(row_positions, target_offsets, ids, logprobs, counts, has_counts, cur_tok, prev_tok,
                   starts, steps, bases, max_nats, id_bytes, vocab_size,
                   id_out, id_offsets, val_out, val_offsets, hit_out, hit_offsets, ref_out, ref_offsets,
                   cnt_out, cnt_offsets, canon, row_syms, seen, stamp_pos, stamp_idx, unused,
                   last_by_token, pair_keys, pair_pos):
    """``hit_out`` comes zeroed and ``hit_offsets`` filled in (the bitmap's length follows from the sizes)."""
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
            for j in range(n):
                t = ids[a + j]
                if t < 0 or t >= vocab_size:
                    return 1, p
                if seen[t] == p:
                    return 2, p
                seen[t] = p
                lp = logprobs[a + j]
                if not lp <= 1e-4:  # also catches NaN
                    return 3, p
                c = _code_of(lp, starts, steps, bases, max_nats)
                keys[j] = (c << 40) | (np.int64(t) << 16) | j
            _sort_nearly_sorted(keys)
            r, slot, key = _reference(cur, prev, last_by_token, pair_keys, pair_pos)
            if r >= 0:
                for i in range(target_offsets[r], target_offsets[r + 1]):
                    stamp_pos[canon[i]] = p
                    stamp_idx[canon[i]] = i - target_offsets[r]
                _fill_unused(unused, target_offsets[r + 1] - target_offsets[r])
            prev_c = -1
            prev_id = -1
            for j in range(n):
                c = keys[j] >> 40
                t = (keys[j] >> 16) & 0xFFFFFF
                vpos = _put_varint(val_out, vpos, c if j == 0 else c - prev_c)
                if r >= 0 and stamp_pos[t] == p:
                    e = a + j - row_start
                    hit_out[hit_offsets[b] + (e >> 3)] |= np.uint8(1 << (e & 7))
                    rpos = _put_varint(ref_out, rpos, _take_rank(unused, stamp_idx[t]))
                else:
                    row_syms[n_miss] = t - prev_id - 1 if (j > 0 and c == prev_c) else t
                    n_miss += 1
                if has_counts:
                    cnt = counts[a + (keys[j] & 0xFFFF)]
                    if cnt < 1 or cnt > 65535:
                        return 5, p
                    cpos = _put_varint(cnt_out, cpos, cnt - 1)
                canon[a + j] = t
                prev_c = c
                prev_id = t
            last_by_token[cur] = p
            pair_keys[slot] = key
            pair_pos[slot] = p
        for q in range(id_bytes):
            for i in range(n_miss):
                id_out[ipos + q * n_miss + i] = (row_syms[i] >> (8 * q)) & 0xFF
        ipos += id_bytes * n_miss
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


def encode_targets(row_positions, target_offsets, ids, logprobs, counts, contexts, layout: S.Layout,
                   where: str = "<batch>") -> TargetStreams:
    """Encode the CSR targets of a record batch into per-row byte streams (numba kernel).

    ``contexts`` is (cur, prev) from position_contexts(); ``counts`` is None unless layout.sampled.
    """
    row_positions = np.ascontiguousarray(row_positions, np.int64)
    target_offsets = np.ascontiguousarray(target_offsets, np.int64)
    ids = np.ascontiguousarray(ids, np.int64)
    logprobs = np.ascontiguousarray(logprobs, np.float32)
    cur, prev = (np.ascontiguousarray(c, np.int64) for c in contexts)
    has_counts = counts is not None
    if layout.sampled != has_counts:
        raise CacheFormatError(where, f"{S.TARGET_COUNTS}: the layout says sampled={layout.sampled} "
                               f"but counts were {'given' if has_counts else 'not given'}")
    counts = np.ascontiguousarray(counts if has_counts else np.zeros(0), np.int64)
    n_pos, n_entries, V = len(target_offsets) - 1, len(ids), layout.vocab_size
    if len(cur) != n_pos or len(prev) != n_pos:
        raise CacheFormatError(where, f"contexts: expected {n_pos} per position, got {len(cur)}/{len(prev)}")
    for name, offsets, end in (("target_offsets", target_offsets, n_entries), ("row_positions", row_positions, n_pos)):
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != end or (np.diff(offsets) < 0).any():
            raise CacheFormatError(where, f"{name}: offsets must rise from 0 to {end}")
    if len(logprobs) != n_entries or len(counts) != (n_entries if has_counts else 0):
        raise CacheFormatError(where, f"target_logprobs/target_counts: expected {n_entries} values")
    starts, steps, bases = quantizer_arrays(layout.quantizer)
    sizes = np.diff(target_offsets)
    max_size = int(sizes.max(initial=0))
    row_entries = np.diff(target_offsets[row_positions])
    hit_offsets = hit_bitmap_offsets(row_positions, target_offsets)
    outs = dict(id_out=np.empty(n_entries * layout.id_bytes, np.uint8),
                val_out=np.empty(n_entries * _MAX_VARINT_BYTES, np.uint8),
                hit_out=np.zeros(int(hit_offsets[-1]), np.uint8),
                ref_out=np.empty(n_entries * _MAX_VARINT_BYTES, np.uint8),
                cnt_out=np.empty(n_entries * _MAX_VARINT_BYTES if has_counts else 0, np.uint8))
    offs = {name: np.zeros(len(row_positions), np.int64) for name in ("id", "val", "ref", "cnt")}
    status, at = _encode_kernel(
        row_positions, target_offsets, ids, logprobs, counts, has_counts, cur, prev,
        starts, steps, bases, float(layout.quantizer.max_nats), layout.id_bytes, V,
        outs["id_out"], offs["id"], outs["val_out"], offs["val"], outs["hit_out"], hit_offsets,
        outs["ref_out"], offs["ref"], outs["cnt_out"], offs["cnt"], np.empty(n_entries, np.int64),
        np.empty(int(row_entries.max(initial=0)), np.int64), np.full(V, -1, np.int64),
        np.full(V, -1, np.int64), np.zeros(V, np.int64), np.zeros((max_size + 63) // 64 + 1, np.uint64),
        *_context_tables(V, n_pos))
    if status != _OK:
        raise CacheFormatError(where, f"target position {at}: {_STATUS_TEXT[status]}")
    return TargetStreams(ids=outs["id_out"][:offs["id"][-1]], id_offsets=offs["id"],
                         values=outs["val_out"][:offs["val"][-1]], value_offsets=offs["val"],
                         hits=outs["hit_out"], hit_offsets=hit_offsets,
                         refs=outs["ref_out"][:offs["ref"][-1]], ref_offsets=offs["ref"],
                         counts=outs["cnt_out"][:offs["cnt"][-1]], count_offsets=offs["cnt"])


def encode_targets_reference(row_positions, target_offsets, ids, logprobs, counts, contexts,
                             layout: S.Layout) -> TargetStreams:
    """Plain Python reference of encode_targets (the same bytes; no input checks)."""
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
            ref = canon.get(_reference_python(tables, int(cur[p]), int(prev[p])), [])
            unused = list(ref)  # the reference's ids no entry of this position has hit yet, in its order
            prev_c = prev_id = None
            for src in order:
                c, t = int(codes_all[a + src]), int(ids[a + src])
                row["values"] += _varint_reference(c if prev_c is None else c - prev_c)
                hit_bits.append(t in unused)
                if t in unused:
                    row["refs"] += _varint_reference(unused.index(t))
                    unused.remove(t)
                else:
                    syms.append(t - prev_id - 1 if prev_c == c else t)
                if counts is not None:
                    row["counts"] += _varint_reference(int(counts[a + src]) - 1)
                prev_c, prev_id = c, t
            canon[p] = [int(ids[a + src]) for src in order]
            tables[("token", int(cur[p]))] = tables[("pair", int(prev[p]), int(cur[p]))] = p
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


@numba.njit(nogil=True, cache=True)
def _decode_kernel(sizes, row_positions, cur_tok, prev_tok, id_stream, id_offsets, val_stream, val_offsets,
                   hit_stream, hit_offsets, ref_stream, ref_offsets, cnt_stream, cnt_offsets, has_counts, lut,
                   id_bytes, vocab_size, target_offsets, out_ids, out_lp, out_counts, unused,
                   last_by_token, pair_keys, pair_pos):
    """Positions in order, entries in one pass: the position's reference comes from the contexts alone,
    so each entry's value varint, hit bit and rank varint or id symbol are read and resolved together.

    The per-entry loads and stores index with np.uint64: numba then drops its negative-index wraparound
    branch (every index here is already checked to lie in range, so it is never negative); 20% faster."""
    max_code = len(lut) - 1
    for b in range(len(row_positions) - 1):
        ib, n_id_bytes = id_offsets[b], id_offsets[b + 1] - id_offsets[b]
        if n_id_bytes % id_bytes != 0:
            return 11, b
        n_miss = n_id_bytes // id_bytes
        miss = 0
        row_start = target_offsets[row_positions[b]]
        row_entries = target_offsets[row_positions[b + 1]] - row_start
        hb = hit_offsets[b]
        if hit_offsets[b + 1] - hb != (row_entries + 7) >> 3:
            return 21, b
        if row_entries & 7 and hit_stream[hb + (row_entries >> 3)] >> (row_entries & 7) != 0:
            return 22, b
        v, v_end = val_offsets[b], val_offsets[b + 1]
        rp, r_end = ref_offsets[b], ref_offsets[b + 1]
        cp, c_end = cnt_offsets[b], cnt_offsets[b + 1]
        for p in range(row_positions[b], row_positions[b + 1]):
            cur, prev = cur_tok[p], prev_tok[p]
            if cur < 0 or cur >= vocab_size or prev < -1 or prev >= vocab_size:
                return 6, b
            r, slot, key = _reference(cur, prev, last_by_token, pair_keys, pair_pos)
            r_start = target_offsets[r] if r >= 0 else 0
            r_n = target_offsets[r + 1] - r_start if r >= 0 else 0
            _fill_unused(unused, r_n)
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
                    d, v = _get_varint(val_stream, v, v_end)
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
                        s, rp = _get_varint(ref_stream, rp, r_end)
                        if rp < 0:
                            return 13, b
                    m = _take_unused(unused, n_words, s)
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
                for j in range(n):
                    cnt, cp = _get_varint(cnt_stream, cp, c_end)
                    if cp < 0:
                        return 16, b
                    out_counts[e + j] = cnt + 1
            last_by_token[cur] = p
            pair_keys[slot] = key
            pair_pos[slot] = p
        if miss != n_miss:
            return 20, b
        if v != v_end:
            return 15, b
        if rp != r_end or (has_counts and cp != c_end):
            return 17, b
    return _OK, -1


def decode_targets(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout,
                   where: str = "<batch>"):
    """Decode a record batch's streams back to CSR: (target_offsets, ids int32, logprobs float32,
    counts int32 | None), entries of each position in canonical order."""
    sizes = np.ascontiguousarray(sizes, np.uint16)
    row_positions = np.ascontiguousarray(row_positions, np.int64)
    cur, prev = (np.ascontiguousarray(c, np.int64) for c in contexts)
    target_offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=target_offsets[1:])
    n = int(target_offsets[-1])
    pairs = [(np.asarray(streams.id_offsets, np.int64), streams.ids),
             (np.asarray(streams.value_offsets, np.int64), streams.values),
             (np.asarray(streams.hit_offsets, np.int64), streams.hits),
             (np.asarray(streams.ref_offsets, np.int64), streams.refs),
             (np.asarray(streams.count_offsets, np.int64), streams.counts)]
    if (len(row_positions) == 0 or row_positions[0] != 0 or row_positions[-1] != len(sizes)
            or (np.diff(row_positions) < 0).any() or len(cur) != len(sizes) or len(prev) != len(sizes)
            or any(len(o) != len(row_positions) or o[0] < 0 or o[-1] > len(s) or (np.diff(o) < 0).any()
                   for o, s in pairs)):
        raise CacheCorruptError(where, "per-row offsets of the target streams are inconsistent")
    out_ids = np.empty(n, np.int32)
    out_lp = np.empty(n, np.float32)
    out_counts = np.empty(n if layout.sampled else 0, np.int32)
    status, row = _decode_kernel(
        sizes, row_positions, cur, prev, *(x for offsets, stream in pairs for x in (stream, offsets)),
        layout.sampled, logprob_table(layout.quantizer), layout.id_bytes, layout.vocab_size, target_offsets,
        out_ids, out_lp, out_counts, np.zeros((int(sizes.max(initial=0)) + 63) // 64 + 1, np.uint64),
        *_context_tables(layout.vocab_size, len(sizes)))
    if status != _OK:
        raise CacheCorruptError(where, f"row {row} of the batch: {_STATUS_TEXT[status]}",
                                "the shard is damaged; run `teachercache verify` and rebuild it")
    return target_offsets, out_ids, out_lp, (out_counts if layout.sampled else None)


def decode_targets_reference(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout):
    """Plain Python reference of decode_targets for well-formed streams (no bounds checks)."""
    lut = logprob_table(layout.quantizer)
    cur, prev = contexts
    tables: dict = {}
    canon: dict[int, list[int]] = {}
    ids, lps, counts = [], [], []
    for b in range(len(row_positions) - 1):
        n_miss = (streams.id_offsets[b + 1] - streams.id_offsets[b]) // layout.id_bytes
        planes = streams.ids[streams.id_offsets[b]:streams.id_offsets[b + 1]].astype(np.int64)
        syms = iter(sum(planes[q * n_miss:(q + 1) * n_miss] << (8 * q) for q in range(layout.id_bytes)))
        row = {name: iter(_read_varints(bytes(getattr(streams, name)[
            getattr(streams, off)[b]:getattr(streams, off)[b + 1]])))
            for name, off in (("values", "value_offsets"), ("refs", "ref_offsets"), ("counts", "count_offsets"))}
        hits = iter(np.unpackbits(streams.hits[streams.hit_offsets[b]:streams.hit_offsets[b + 1]],
                                  bitorder="little"))
        for p in range(row_positions[b], row_positions[b + 1]):
            unused = list(canon.get(_reference_python(tables, int(cur[p]), int(prev[p])), []))
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
            tables[("token", int(cur[p]))] = tables[("pair", int(prev[p]), int(cur[p]))] = p
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
    return (offsets, np.asarray(ids, np.int32), np.asarray(lps, np.float32),
            np.asarray(counts, np.int32) if layout.sampled else None)
