"""Format version 3's codec: a hand-worked batch byte for byte, each of its parts (reference selectors,
value tokens, the id table) against plain Python on cases that reach its limits, and hostile streams that
must fail with a CacheCorruptError naming the batch and the column, never a crash or a wrong answer.
(test_codec.py compares the kernels with codec3_reference on random and adversarial batches.)"""

from __future__ import annotations

import numpy as np
import pytest

from teachercache.errors import CacheCorruptError, CacheFormatError
from teachercache.format import codec, codec3, codec3_encode, codec3_reference
from teachercache.format import schema as S

LAYOUT = S.Layout(vocab_size=10)
CTX = (np.array([1, 2, 1]), np.array([-1, 1, -1]))
ROWS = np.array([0, 2, 3], np.int64)


def _csr(groups):
    offsets = np.concatenate([[0], np.cumsum([len(g[0]) for g in groups])]).astype(np.int64)
    ids = np.concatenate([np.asarray(g[0], np.int64) for g in groups]) if groups else np.zeros(0, np.int64)
    lps = np.concatenate([np.asarray(g[1], np.float32) for g in groups]) if groups else np.zeros(0, np.float32)
    return offsets, ids, lps


def _hand_worked(layout=LAYOUT, counts=None):
    """Three positions in two rows (docs/FORMAT.md works through the same batch):
    p0 (cur 1, first of its row) [5, 9, 2] at -0.1, -3, -3 -> codes 13, 180, 180 -> canonical [5, 2, 9]
    p1 (cur 2, prev 1)          [7] at -200             -> code 631 (-log p clipped at 80 nats)
    p2 (cur 1, first of its row) [9, 5, 1] at -0.2, -2, -4 -> codes 26, 154, 206, same context as p0."""
    offsets, ids, lps = _csr([([5, 9, 2], [-0.1, -3.0, -3.0]), ([7], [-200.0]), ([9, 5, 1], [-0.2, -2.0, -4.0])])
    return offsets, codec.encode_targets(ROWS, offsets, ids, lps, counts, CTX, layout)


def test_hand_worked_batch_byte_for_byte():
    offsets, s = _hand_worked()
    # p2's candidates: 0 (same pair) and 1 (same token) are both p0, which holds 9 and 5: selector 0.
    # p0 and p1 have no candidate holding any of their ids: selector 0 (no reference).
    # ranks: 9 is index 2 of p0's [5, 2, 9], then 5 is index 0 of what is left, [5, 2].
    assert s.refs.tolist() == [0, 0, 0, 2, 0]
    assert s.hits.tolist() == [0b00110000]  # entries 4 and 5 of the batch (p2's first two) are hits
    # deltas [13, 167, 0], [631], [26, 128, 52]: one group (sizes <= 8); no two consecutive deltas below 10,
    # so no pair; 13, 0, 26, 128 and 52 are single tokens 100 + d (below 155); 167 and 631 are escaped:
    # token 255, and a varint after the tokens.
    tokens = [100 + 13, 255, 100 + 0, 255, 100 + 26, 100 + 128, 100 + 52]
    assert s.values.tolist() == [1, len(tokens)] + tokens + [0xA7, 0x01, 0xF7, 0x04]
    # misses in order: 5, 2, 9 (a tie with 2: its symbol is the gap 9 - 2 - 1 = 6), 7, 1; each misses once,
    # so the table is empty and all five are escapes, one byte each (vocab_size 10).
    assert s.ids.tolist() == [5, 0, 0, 5] + [255] * 5 + [5, 2, 6, 7, 1]
    for name in codec.TargetStreams.STREAMS:  # the whole batch in the first row
        assert getattr(s, name[:-1] + "_offsets").tolist() == [0, len(getattr(s, name)), len(getattr(s, name))]
    off, ids, lps, _ = codec.decode_targets(np.diff(offsets).astype(np.uint16), ROWS, CTX, s, LAYOUT)
    assert ids.tolist() == [5, 2, 9, 7, 9, 5, 1]
    np.testing.assert_allclose(lps, [-13 / 128, -(1 + 52 / 26), -(1 + 52 / 26), -80.0, -26 / 128, -2.0, -4.0],
                               atol=1e-6)


def test_selector_picks_the_candidate_with_most_hits():
    """Position 4 (token 3) has candidates p3 (same token, 1 of its ids) and p2 (second latest with the token,
    all three): selector 2, and every entry is a hit."""
    groups = [([1, 2, 3], [-1.0, -2.0, -3.0]), ([4], [-1.0]), ([1, 2, 3], [-1.0, -2.0, -3.0]),
              ([1, 7, 8], [-1.0, -2.0, -3.0]), ([3, 2, 1], [-1.0, -2.0, -3.0])]
    offsets, ids, lps = _csr(groups)
    ctx = (np.array([0, 5, 3, 3, 3]), np.array([-1, 0, 4, 6, 7]))
    rows = np.array([0, 5], np.int64)
    s = codec.encode_targets(rows, offsets, ids, lps, None, ctx, LAYOUT)
    assert s.refs[:5].tolist() == [0, 0, 6, 1, 2]  # p2: p0 = p - 2 (selector 6); p3: p2 = same token (1)
    assert np.unpackbits(s.hits, bitorder="little")[10:13].tolist() == [1, 1, 1]  # p4's entries
    dec = codec.decode_targets(np.diff(offsets).astype(np.uint16), rows, ctx, s, LAYOUT)
    assert dec[1][10:13].tolist() == [3, 2, 1]


def test_value_tokens_pairs_groups_and_escapes():
    """Deltas below 10 pair up within a group of 8 entries; a group's last entry never pairs with the next
    group's first; 10 entries make two groups; a delta of 155 or more is escaped."""
    q = S.Quantizer()
    codes = [128, 129, 130, 130, 131, 140, 141, 141, 142, 300]  # x = 1 + (code - 128) / 26 nats
    lps = [-(1 + (c - 128) / 26) for c in codes]
    offsets, ids, lps = _csr([(list(range(10)), lps)])
    layout = S.Layout(vocab_size=10, quantizer=q)
    s = codec.encode_targets(np.array([0, 1]), offsets, ids, lps, None, (np.array([0]), np.array([-1])), layout)
    # deltas 128 | 1 1 | 0 1 | 9 1 | 0 (group 0, 8 entries)  and  1 158 (group 1)
    group0 = [100 + 128, 1 * 10 + 1, 0 * 10 + 1, 9 * 10 + 1, 100 + 0]
    group1 = [100 + 1, 255]
    assert s.values.tolist() == [2, len(group0), len(group1)] + group0 + group1 + [158, 0x01]
    assert codec3_reference.encode_targets_reference(np.array([0, 1]), offsets, ids, lps, None, (np.array([0]),
                                                     np.array([-1])), layout).values.tolist() == s.values.tolist()


def test_id_table_orders_by_misses_then_id_and_stops_at_its_size():
    ids = np.array([5, 3, 5, 9, 3, 3, 7, 9, 1], np.int64)  # 3 x3, 5 x2, 9 x2, 7 and 1 once
    assert codec3_encode.id_table(ids, 10).tolist() == [3, 5, 9]
    many = np.repeat(np.arange(codec3.TABLE_SIZE + 100), 2)
    table = codec3_encode.id_table(many, len(many))
    assert len(table) == codec3.TABLE_SIZE and table[-1] == codec3.TABLE_SIZE - 1


def test_two_byte_ranks_and_escapes_beyond_the_table_match_the_reference():
    """More ids missing twice than the table holds: ranks of one and two bytes and escapes, ties included."""
    rng = np.random.default_rng(5)
    V = 40_000
    n_pos, k = 9_000, 8
    groups = [(rng.choice(V // 2, k, replace=False), -np.sort(rng.integers(0, 3, k)) / 26.0 - 1.5)
              for _ in range(n_pos)]  # few distinct codes: many ties
    offsets, ids, lps = _csr(groups)
    ctx = (np.arange(n_pos) % 7, np.full(n_pos, -1))
    layout = S.Layout(vocab_size=V)
    rows = np.array([0, n_pos], np.int64)
    got = codec.encode_targets(rows, offsets, ids, lps, None, ctx, layout)
    want = codec3_reference.encode_targets_reference(rows, offsets, ids, lps, None, ctx, layout)
    for name in codec.TargetStreams.FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    from teachercache.format.bits import read_varints
    n_miss, n_table, n_ext, n_esc = read_varints(bytes(got.ids[:20]))[:4]
    assert n_table == codec3.TABLE_SIZE and n_ext > 0 and n_esc > 0  # all three kinds of miss occur
    sizes = np.diff(offsets).astype(np.uint16)
    dec = codec.decode_targets(sizes, rows, ctx, got, layout)
    ref = codec3_reference.decode_targets_reference(sizes, rows, ctx, got, layout)
    for a, b in zip(dec[:3], ref[:3]):
        np.testing.assert_array_equal(a, b)
    for p in range(0, n_pos, 97):
        assert sorted(dec[1][offsets[p]:offsets[p + 1]].tolist()) == sorted(groups[p][0].tolist())


def test_batches_without_positions_or_entries():
    empty = codec.encode_targets(np.array([0, 0, 0]), np.array([0]), np.zeros(0), np.zeros(0), None,
                                 (np.zeros(0), np.zeros(0)), LAYOUT)
    assert all(len(getattr(empty, n)) == 0 for n in codec.TargetStreams.STREAMS)
    assert codec.decode_targets(np.zeros(0, np.uint16), np.array([0, 0, 0]), (np.zeros(0), np.zeros(0)), empty,
                                LAYOUT)[1].size == 0
    zero = codec.encode_targets(np.array([0, 2]), np.array([0, 0, 0]), np.zeros(0), np.zeros(0), None,
                                (np.array([1, 2]), np.array([-1, 1])), LAYOUT)
    assert zero.values.tolist() == [0] and zero.ids.tolist() == [0, 0, 0, 0] and zero.refs.tolist() == [0, 0]
    assert codec.decode_targets(np.zeros(2, np.uint16), np.array([0, 2]), (np.array([1, 2]), np.array([-1, 1])),
                                zero, LAYOUT)[1].size == 0
    with pytest.raises(CacheCorruptError, match="without target positions has non-empty"):
        codec.decode_targets(np.zeros(0, np.uint16), np.array([0, 0]), (np.zeros(0), np.zeros(0)), zero, LAYOUT,
                             where="s.arrow")


def _set(name, index, value):
    def damage(s):
        stream = getattr(s, name).copy()
        stream[index] = value
        setattr(s, name, stream)
    return damage


def _resize(name, stream):
    def damage(s):
        setattr(s, name, np.asarray(stream(getattr(s, name)), np.uint8))
        offsets = np.full(3, len(getattr(s, name)), np.int64)
        offsets[0] = 0
        setattr(s, name[:-1] + "_offsets", offsets)
    return damage


@pytest.mark.parametrize("damage, problem", [
    (_resize("values", lambda v: v[:-1]), "target_values: an escaped delta is malformed"),
    (_resize("values", lambda v: np.r_[v, 0]), "target_values: an escaped delta is malformed, or escaped deltas "
                                               "are left over"),
    (_resize("values", lambda v: np.r_[v[:-1], 0x80]), "target_values: an escaped delta is malformed"),
    (_set("values", 0, 2), "target_values: the number of groups does not fit"),
    (_set("values", 1, 200), "target_values: the group header is malformed"),
    (_set("values", 1, 6), "beyond the quantiser"),  # the escapes then start a token early: 255, 0xA7, 0x01
    (_set("values", 2, 0), "target_values|beyond the quantiser"),  # a pair token where a single was
    (_set("values", 10, 0x7F), "beyond the quantiser"),  # 167 -> 255 + ...: a code past the largest
    (_set("ids", 0, 6), "target_ids: the header is malformed"),
    (_set("ids", 4, 0), "target_ids: a miss refers to a rank beyond the id table"),
    (_set("ids", 9, 0xFF), "outside the vocabulary"),
    (_resize("ids", lambda v: v[:-1]), "target_ids: the header is malformed or the table and planes do not add up"),
    (_set("refs", 2, 9), "target_refs: a reference selector is beyond 7"),
    (_resize("refs", lambda v: v[:2]), "target_refs: the stream is shorter than one selector"),
    (_set("refs", 3, 0x7F), "outside its reference list"),
    (_resize("refs", lambda v: v[:-1]), "varint is malformed or runs past"),
    (_set("hits", 0, 0b00110001), "marked a hit but its position has no reference"),
    (_set("hits", 0, 0b00010000), "target_ids: the misses use more or fewer symbols"),  # a hit turned miss
    (_set("hits", 0, 0b10110000), "bits set past the row's last entry"),
    (_resize("hits", lambda v: v[:0]), "bitmap's length does not match"),
    (_set("value_offsets", 1, 3), "target_values: bytes in a row after the first"),  # the same bytes, split
])
def test_decode_refuses_damaged_streams(damage, problem):
    offsets, s = _hand_worked()
    damage(s)
    sizes = np.diff(offsets).astype(np.uint16)
    with pytest.raises(CacheCorruptError, match=problem) as refused:
        codec.decode_targets(sizes, ROWS, CTX, s, LAYOUT, where="shard.arrow (batch 0)")
    assert "shard.arrow (batch 0)" in str(refused.value) and "teachercache verify" in str(refused.value)


def test_a_size_beyond_the_tokens_is_refused():
    offsets, s = _hand_worked()
    sizes = np.diff(offsets).astype(np.uint16) + np.array([0, 0, 1], np.uint16)
    with pytest.raises(CacheCorruptError, match="target position 2 of the batch: target_values: a group's tokens "
                                                "end before its entries do"):
        codec.decode_targets(sizes, ROWS, CTX, s, LAYOUT)


def test_damaged_counts_are_refused():
    layout = S.Layout(vocab_size=10, sampled=True)
    offsets, s = _hand_worked(layout, counts=np.array([1, 2, 3, 4, 5, 6, 7]))
    sizes = np.diff(offsets).astype(np.uint16)
    assert codec.decode_targets(sizes, ROWS, CTX, s, layout)[3].tolist() == [1, 3, 2, 4, 5, 6, 7]
    _resize("counts", lambda v: np.r_[v, 0])(s)
    with pytest.raises(CacheCorruptError, match="count or ref stream has bytes left over"):
        codec.decode_targets(sizes, ROWS, CTX, s, layout)


def test_random_damage_is_refused_or_decoded_never_a_crash():
    """Valid encodings with 1-3 flipped bits, changed sizes or contexts: decoded (any ids, all in the
    vocabulary) or refused with the project's error; never an IndexError (tests run with numba's bounds
    checks off: an out-of-bounds read would be garbage or a crash, not an exception)."""
    rng = np.random.default_rng(0)
    refused = decoded = 0
    for trial in range(1500):
        V = [10, 300, 70_000][trial % 3]
        layout = S.Layout(vocab_size=V, sampled=trial % 2 == 1)
        n = int(rng.integers(1, 14))
        groups = [(rng.choice(min(V, 30), m, replace=False), -rng.random(m) * 8)
                  for m in rng.integers(0, min(V, 12), n)]
        offsets, ids, lps = _csr(groups)
        ctx = (rng.integers(0, 3, n), np.where(rng.random(n) < 0.3, -1, rng.integers(0, 3, n)))
        counts = rng.integers(1, 5, len(ids)) if layout.sampled else None
        rows = np.array([0, n], np.int64)
        s = codec.encode_targets(rows, offsets, ids, lps, counts, ctx, layout)
        sizes = np.diff(offsets).astype(np.uint16)
        for _ in range(int(rng.integers(1, 4))):
            what = int(rng.integers(0, 3))
            if what == 0:
                name = ["ids", "values", "hits", "refs", "counts"][int(rng.integers(0, 5))]
                stream = getattr(s, name).copy()
                if len(stream):
                    stream[rng.integers(len(stream))] ^= np.uint8(1 << int(rng.integers(0, 8)))
                setattr(s, name, stream)
            elif what == 1:
                sizes[rng.integers(n)] = (int(sizes[0]) + int(rng.choice([1, 2, 65535, 9]))) % 65536
            else:
                ctx[int(rng.integers(0, 2))][rng.integers(n)] = rng.choice([-2, -1, 0, 1, V - 1, V])
        try:
            out = codec.decode_targets(sizes, rows, ctx, s, layout)
            assert ((out[1] >= 0) & (out[1] < V)).all()
            decoded += 1
        except (CacheCorruptError, CacheFormatError):
            refused += 1
    assert refused > 500 and decoded > 50


FORKED_DECODE = """
import multiprocessing as mp
import numpy as np
import torch
from teachercache.format import codec, schema as S

torch.set_num_threads(1)
rng = np.random.default_rng(3)
layout = S.Layout(vocab_size=5000)
n = 300
offsets = np.arange(n + 1) * 16
ids = np.concatenate([rng.choice(80, 16, replace=False) * 60 for _ in range(n)])
lps = -rng.random(len(ids)).astype(np.float32) * 9
rows = np.array([0, 100, n])
ctx = (rng.integers(0, 5, n), np.where(np.arange(n) % 100 == 0, -1, rng.integers(0, 5, n)))
streams = codec.encode_targets(rows, offsets, ids, lps, None, ctx, layout)
sizes = np.diff(offsets).astype(np.uint16)
parent = codec.decode_targets(sizes, rows, ctx, streams, layout)  # compiled and run before the fork


def child(queue):
    out = codec.decode_targets(sizes, rows, ctx, streams, layout)
    queue.put((out[1].tolist(), out[2].tolist()))


queue = mp.get_context("fork").Queue()
workers = [mp.get_context("fork").Process(target=child, args=(queue,)) for _ in range(2)]
for w in workers:
    w.start()
results = [queue.get(timeout=120) for _ in workers]
for w in workers:
    w.join(timeout=120)
    assert w.exitcode == 0
assert all(r == (parent[1].tolist(), parent[2].tolist()) for r in results)
print("ok")
"""


def test_decoding_in_forked_workers_under_one_torch_thread():
    """The codec's kernels are serial numba functions: after torch.set_num_threads(1) and a decode in the
    parent, DataLoader-style forked workers decode the same batch to the same arrays."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", FORKED_DECODE], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
