"""Bit-level primitives of the target codec: varints, and rank/select over a reference list's unused ids.

* Varints: unsigned LEB128 (7 bits per byte, high bit = more bytes follow), at most 3 bytes per entry:
  codes, counts and ranks are all < 2**21; at most 5 in version 3's stream headers (``get_header_varint``).
  ``put_varint`` / ``get_varint`` for the kernels (the reader checks every byte against its stream's end),
  ``varint_reference`` / ``read_varints`` in plain Python.
* Unused lists: a hit's rank counts the reference's ids that no earlier entry of its position has taken
  (docs/FORMAT.md, "References"). The flags live in 64-bit words; ``take_rank`` (encoder) popcounts the
  words before an entry, ``take_unused`` (decoder) selects the set bit of a rank: ``pdep`` + ``tzcnt``
  where the compile target has BMI2 (``HAS_BMI2``), a branch-free byte-table select elsewhere.

All kernel helpers are ``inline="always"``: they compile into the encode and decode kernels of
teachercache.format.codec as if written there.
"""

from __future__ import annotations

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

MAX_VARINT_BYTES = 3
"""The longest varint the codec writes or accepts: codes, counts and ref symbols are all < 2**21."""


# ---------------------------------------------------------------------------------------------------
# Varints.


@numba.njit(nogil=True, cache=True, inline="always")
def put_varint(out, pos, value):
    """Write ``value`` as a varint at out[pos:]; returns the position after it."""
    while value >= 0x80:
        out[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


@numba.njit(nogil=True, cache=True, inline="always")
def get_varint(buf, pos, end):
    """(value, new_pos); new_pos = -1 if the varint runs past ``end`` or is longer than 3 bytes."""
    return _read_varint(buf, pos, end, MAX_VARINT_BYTES)


@numba.njit(nogil=True, cache=True, inline="always")
def _read_varint(buf, pos, end, max_bytes):
    """(value, new_pos) of the varint at ``pos``; new_pos = -1 if it runs past ``end`` or is longer than
    ``max_bytes``."""
    value = np.int64(0)
    for i in range(max_bytes):
        if pos >= end:
            return value, -1
        byte = np.int64(buf[pos])
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos
    return value, -1


MAX_HEADER_VARINT_BYTES = 5
"""The longest varint of a stream header (version 3's counts of a record batch's misses, escapes, segment
bytes): values < 2**35."""


@numba.njit(nogil=True, cache=True, inline="always")
def get_header_varint(buf, pos, end):
    """get_varint for header counts: (value, new_pos); new_pos = -1 if it runs past ``end`` or is longer
    than MAX_HEADER_VARINT_BYTES."""
    return _read_varint(buf, pos, end, MAX_HEADER_VARINT_BYTES)


def varint_reference(value: int) -> bytes:
    """Plain Python reference of put_varint: the varint bytes of ``value``."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varints(data: bytes) -> list[int]:
    """Plain Python reference of get_varint: every varint of a well-formed byte string."""
    out, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            out.append(value)
            value, shift = 0, 0
    return out


# ---------------------------------------------------------------------------------------------------
# Bit counting and selecting in a 64-bit word.


@intrinsic
def _popcount(typingctx, x):
    """Number of set bits of an unsigned integer (LLVM ctpop: one instruction on current CPUs)."""
    if not isinstance(x, numba.types.Integer):
        return None
    return x(x), lambda context, builder, sig, args: builder.ctpop(args[0])


@numba.njit(nogil=True, cache=True, inline="always")
def popcount(x):
    """Number of set bits of a 64-bit word, as int64 (codec3's signature overlaps)."""
    return np.int64(_popcount(np.uint64(x)))


@intrinsic
def _trailing_zeros(typingctx, x):
    """Index of the lowest set bit of a non-zero unsigned integer (LLVM cttz)."""
    if not isinstance(x, numba.types.Integer):
        return None
    return x(x), lambda context, builder, sig, args: builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))


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


# ---------------------------------------------------------------------------------------------------
# A reference list's unused entries: bit i of word i // 64 set while entry i is not taken yet.


@numba.njit(nogil=True, cache=True, inline="always")
def fill_unused(unused, n):
    """Mark entries 0..n-1 of a reference list unused: bit i of word i // 64 set."""
    full = n >> 6
    for w in range(full):
        unused[w] = np.uint64(0xFFFFFFFFFFFFFFFF)
    if n & 63:
        unused[full] = (np.uint64(1) << np.uint64(n & 63)) - np.uint64(1)


@numba.njit(nogil=True, cache=True, inline="always")
def take_rank(unused, m):
    """The rank of unused entry m (how many unused entries come before it); marks it used."""
    w = m >> 6
    bit = np.uint64(1) << np.uint64(m & 63)
    rank = np.int64(_popcount(unused[w] & (bit - np.uint64(1))))
    for i in range(w):
        rank += np.int64(_popcount(unused[i]))
    unused[w] &= ~bit
    return rank


@numba.njit(nogil=True, cache=True, inline="always")
def take_unused(unused, n_words, rank):
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
