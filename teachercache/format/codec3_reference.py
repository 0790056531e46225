"""Plain Python references of format version 3's encoder and decoder (codec3_encode, codec3_decode).

Written from docs/FORMAT.md ("Target streams, version 3") with lists and dicts, no numba and no shared
helper of the kernels but the quantiser's code table; the tests compare them with the kernels byte for
byte. Slow: for small batches only.
"""

from __future__ import annotations

import numpy as np

from teachercache.format import schema as S
from teachercache.format.bits import read_varints, varint_reference
from teachercache.format.codec3 import (ESCAPE_ID, ESCAPE_TOKEN, GROUP_SIZE, ONE_BYTE_RANKS, PAIR_BASE, SINGLE_TOKEN,
                                        TABLE_SIZE, batch_streams)
from teachercache.format.quantizer import logprob_table, quantize_reference
from teachercache.format.streams import TargetStreams


class _Contexts:
    """The earlier positions of each token and each (prev, cur) pair, latest last."""

    def __init__(self):
        self.by_token: dict[int, list[int]] = {}
        self.by_pair: dict[tuple[int, int], list[int]] = {}

    def candidates(self, p: int, cur: int, prev: int) -> list[int]:
        """The 8 reference candidates of position p (-1: none), in selector order."""
        pair, token = self.by_pair.get((prev, cur), []), self.by_token.get(cur, [])
        latest = lambda seq, i: seq[-i] if len(seq) >= i else -1  # noqa: E731
        return [latest(pair, 1)] + [latest(token, i) for i in (1, 2, 3, 4)] + \
            [p - 1 if p >= 1 else -1, p - 2 if p >= 2 else -1, latest(pair, 2)]

    def record(self, p: int, cur: int, prev: int) -> None:
        self.by_token.setdefault(cur, []).append(p)
        self.by_pair.setdefault((prev, cur), []).append(p)


def encode_targets_reference(row_positions, target_offsets, ids, logprobs, counts, contexts,
                             layout: S.Layout) -> TargetStreams:
    """Plain Python reference of codec3_encode.encode_targets (the same bytes; no input checks)."""
    codes_all = quantize_reference(logprobs, layout.quantizer)
    cur, prev = (np.asarray(c).tolist() for c in contexts)
    n_pos = len(target_offsets) - 1
    if n_pos == 0:
        return batch_streams(dict.fromkeys(TargetStreams.STREAMS, np.zeros(0, np.uint8)), len(row_positions) - 1)
    seen = _Contexts()
    signatures: list[set[int]] = []
    canon: list[list[int]] = []
    deltas: list[list[int]] = []
    hit_bits, selectors, ranks, count_bytes, misses = [], [], bytearray(), bytearray(), []
    for p in range(n_pos):
        a, z = target_offsets[p], target_offsets[p + 1]
        order = sorted(range(a, z), key=lambda e: (int(codes_all[e]), int(ids[e])))
        mine = {int(ids[e]) for e in order}
        signatures.append({_signature_bit(t) for t in mine})
        cands = seen.candidates(p, cur[p], prev[p])
        s = _choose(cands, mine, signatures, canon)
        selectors.append(s)
        unused = list(canon[cands[s]]) if cands[s] >= 0 else []
        canon.append([int(ids[e]) for e in order])
        deltas.append([])
        prev_c = prev_id = None
        for e in order:
            c, t = int(codes_all[e]), int(ids[e])
            deltas[p].append(c if prev_c is None else c - prev_c)
            hit_bits.append(t in unused)
            if t in unused:
                ranks += varint_reference(unused.index(t))
                unused.remove(t)
            else:
                misses.append((t, t - prev_id - 1 if prev_c == c else t))
            if counts is not None:
                count_bytes += varint_reference(int(counts[e]) - 1)
            prev_c, prev_id = c, t
        seen.record(p, cur[p], prev[p])
    return batch_streams({"ids": _id_stream_reference(misses, layout.id_bytes), "values": _values_reference(deltas),
                          "hits": np.packbits(np.asarray(hit_bits, bool), bitorder="little"),
                          "refs": np.frombuffer(bytes(selectors) + bytes(ranks), np.uint8),
                          "counts": np.frombuffer(bytes(count_bytes), np.uint8)}, len(row_positions) - 1)


def _signature_bit(t: int) -> int:
    """codec3.signature_bit: the top 8 bits of t * 0x9E3779B97F4A7C15 modulo 2**64."""
    return (t * 0x9E3779B97F4A7C15 % 2**64) >> 56


def _choose(candidates: list[int], mine: set[int], signatures: list[set[int]], canon: list[list[int]]) -> int:
    """The encoder's selector: of the (distinct, existing) candidates, the two whose signatures share most
    bits with the position's (earlier selectors first on a tie) are counted exactly; the one holding more of
    the position's ids wins (the earlier on a tie); 0 when neither holds any."""
    estimates = []
    for s, r in enumerate(candidates):
        if r >= 0 and r not in candidates[:s]:
            estimates.append((-len(signatures[-1] & signatures[r]), s))
    best, best_hits = 0, 0
    for _, s in sorted(sorted(estimates)[:2], key=lambda e: e[1]):
        hits = len(mine & set(canon[candidates[s]]))
        if hits > best_hits:
            best, best_hits = s, hits
    return best


def _values_reference(deltas: list[list[int]]) -> np.ndarray:
    """target_values from each position's value deltas."""
    n_groups = -(-max(len(d) for d in deltas) // GROUP_SIZE)
    segments, escaped = [bytearray() for _ in range(n_groups)], []
    for d in deltas:
        for g in range(n_groups):
            group = d[g * GROUP_SIZE:(g + 1) * GROUP_SIZE]
            i = 0
            while i < len(group):
                if i + 1 < len(group) and group[i] < PAIR_BASE and group[i + 1] < PAIR_BASE:
                    segments[g].append(group[i] * PAIR_BASE + group[i + 1])
                    i += 2
                    continue
                if group[i] < ESCAPE_TOKEN - SINGLE_TOKEN:
                    segments[g].append(SINGLE_TOKEN + group[i])
                else:
                    segments[g].append(ESCAPE_TOKEN)
                i += 1
        escaped += [x for x in d if x >= ESCAPE_TOKEN - SINGLE_TOKEN]  # in decoding order; a pair holds none
    out = varint_reference(n_groups) + b"".join(varint_reference(len(t)) for t in segments) + b"".join(segments)
    out += b"".join(varint_reference(x) for x in escaped)
    return np.frombuffer(out, np.uint8)


def _id_stream_reference(misses: list[tuple[int, int]], id_bytes: int) -> np.ndarray:
    """target_ids from the misses, in order: (id, symbol)."""
    n: dict[int, int] = {}
    for t, _ in misses:
        n[t] = n.get(t, 0) + 1
    table = sorted((t for t in n if n[t] >= 2), key=lambda t: (-n[t], t))[:TABLE_SIZE]
    rank = {t: i for i, t in enumerate(table)}
    first, second, escaped = bytearray(), bytearray(), []
    for t, sym in misses:
        if t not in rank:
            first.append(ESCAPE_ID)
            escaped.append(sym)
        elif rank[t] < ONE_BYTE_RANKS:
            first.append(rank[t])
        else:
            first.append(ONE_BYTE_RANKS + (rank[t] - ONE_BYTE_RANKS) // 256)
            second.append((rank[t] - ONE_BYTE_RANKS) % 256)

    def planes(symbols):
        return bytes((x >> (8 * q)) & 0xFF for q in range(id_bytes) for x in symbols)

    header = b"".join(varint_reference(x) for x in (len(misses), len(table), len(second), len(escaped)))
    return np.frombuffer(header + planes(table) + bytes(first) + bytes(second) + planes(escaped), np.uint8)


def decode_targets_reference(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout):
    """Plain Python reference of codec3_decode.decode_targets for well-formed streams (no checks)."""
    lut = logprob_table(layout.quantizer)
    whole = {name: bytes(getattr(streams, name)[getattr(streams, name[:-1] + "_offsets")[0]:
                                                getattr(streams, name[:-1] + "_offsets")[-1]])
             for name in TargetStreams.STREAMS}
    sizes = [int(x) for x in sizes]
    cur, prev = (np.asarray(c).tolist() for c in contexts)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
    if not sizes:
        return offsets, np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32) if layout.sampled else None
    deltas = _values_decoded(whole["values"], sizes)
    ids_of_miss = _misses_decoded(whole["ids"], layout.id_bytes)
    hits = iter(np.unpackbits(np.frombuffer(whole["hits"], np.uint8), bitorder="little"))
    selectors, ranks = whole["refs"][:len(sizes)], iter(read_varints(whole["refs"][len(sizes):]))
    counts = iter(read_varints(whole["counts"]))
    seen, canon, ids, lps, out_counts = _Contexts(), [], [], [], []
    for p, n in enumerate(sizes):
        r = seen.candidates(p, cur[p], prev[p])[selectors[p]]
        unused = list(canon[r]) if r >= 0 else []
        canon.append([])
        c = 0
        for j in range(n):
            d = deltas[p][j]
            c = d if j == 0 else c + d
            if next(hits):
                t = unused.pop(next(ranks))
            else:
                t = next(ids_of_miss)
                if t[0] == "escaped" and j > 0 and d == 0:  # a tie: the symbol is the gap after the previous id
                    t = ("id", canon[p][-1] + 1 + t[1])
                t = t[1]
            canon[p].append(t)
            ids.append(t)
            lps.append(lut[c])
        if layout.sampled:
            out_counts += [next(counts) + 1 for _ in range(n)]
        seen.record(p, cur[p], prev[p])
    return (offsets, np.asarray(ids, np.int32), np.asarray(lps, np.float32),
            np.asarray(out_counts, np.int32) if layout.sampled else None)


def _values_decoded(data: bytes, sizes: list[int]) -> list[list[int]]:
    """Each position's value deltas from target_values."""
    varints = read_varints(data)  # the header's varints come first; their byte length is re-counted below
    n_groups = varints[0]
    lengths = varints[1:1 + n_groups]
    pos = sum(len(varint_reference(x)) for x in varints[:1 + n_groups])
    segments = []
    for length in lengths:
        segments.append(iter(data[pos:pos + length]))
        pos += length
    escaped = iter(read_varints(data[pos:]))
    deltas = []
    for n in sizes:
        d = []
        for g in range(-(-n // GROUP_SIZE)):
            group_size = min(GROUP_SIZE, n - g * GROUP_SIZE)
            group = []
            while len(group) < group_size:
                tok = next(segments[g])
                if tok < SINGLE_TOKEN:
                    group += [tok // PAIR_BASE, tok % PAIR_BASE]
                elif tok < ESCAPE_TOKEN:
                    group.append(tok - SINGLE_TOKEN)
                else:
                    group.append(next(escaped))
            d += group
        deltas.append(d)
    return deltas


def _misses_decoded(data: bytes, id_bytes: int):
    """Iterator of ("id", id) or ("escaped", symbol) per miss, from target_ids."""
    n_miss, n_table, n_ext, n_esc = read_varints(data)[:4]
    pos = sum(len(varint_reference(x)) for x in (n_miss, n_table, n_ext, n_esc))

    def planes(start, count):
        return [sum(data[start + q * count + i] << (8 * q) for q in range(id_bytes)) for i in range(count)]

    table = planes(pos, n_table)
    pos += n_table * id_bytes
    first, second = data[pos:pos + n_miss], iter(data[pos + n_miss:pos + n_miss + n_ext])
    escaped = iter(planes(pos + n_miss + n_ext, n_esc))
    for b in first:
        if b == ESCAPE_ID:
            yield "escaped", next(escaped)
        elif b < ONE_BYTE_RANKS:
            yield "id", table[b]
        else:
            yield "id", table[ONE_BYTE_RANKS + (b - ONE_BYTE_RANKS) * 256 + next(second)]
