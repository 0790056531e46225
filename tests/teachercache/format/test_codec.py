"""Codec, both format versions: the numba kernels against their plain references, round trips within the
stated fidelity (property-tested), and hostile version 2 streams that must fail with the project's own error.
Version 3's hand-worked bytes and hostile streams are in test_codec3.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from helpers import random_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from teachercache.errors import CacheCorruptError, CacheFormatError
from teachercache.format import bits as codec_bits
from teachercache.format import codec, codec2, quantizer, references
from teachercache.format import schema as S
from teachercache.format.records import positions_of_rows


def _csr(groups):
    """[(ids, logprobs), ...] per position -> offsets, ids, logprobs."""
    sizes = [len(g[0]) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ids = np.concatenate([np.asarray(g[0], np.int64) for g in groups]) if groups else np.zeros(0, np.int64)
    lps = np.concatenate([np.asarray(g[1], np.float32) for g in groups]) if groups else np.zeros(0, np.float32)
    return offsets, ids, lps


def _assert_same_streams(a: codec.TargetStreams, b: codec.TargetStreams):
    for name in codec.TargetStreams.FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _contexts(n_pos, rng, n_tokens=3):
    """Few distinct context tokens, so that many positions have a reference position."""
    cur = rng.integers(0, n_tokens, n_pos)
    prev = np.where(rng.random(n_pos) < 0.2, -1, rng.integers(0, n_tokens, n_pos))
    return cur, prev


def _as_sets(offsets, ids, lps, counts=None):
    out = []
    for p in range(len(offsets) - 1):
        sl = slice(offsets[p], offsets[p + 1])
        c = counts[sl] if counts is not None else [None] * (offsets[p + 1] - offsets[p])
        out.append({int(i): (float(lp), None if n is None else int(n)) for i, lp, n in zip(ids[sl], lps[sl], c)})
    return out


def test_quantizer_table_matches_reference_codes():
    q = S.Quantizer()
    lut = quantizer.logprob_table(q)
    x = np.linspace(0, q.max_nats + 5, 100_001)
    codes = quantizer.quantize_reference(-x, q)
    err = np.abs(np.minimum(x, q.max_nats) - (-lut[codes]))
    bound = np.array([q.max_error(v) for v in np.minimum(x, q.max_nats)])
    assert (err <= bound + 1e-5).all()
    assert (np.diff(codes) >= 0).all()  # monotone: descending probability = ascending code
    assert lut[0] == 0.0 and lut[-1] == -np.float32(q.max_nats)


def test_quantizer_rejects_pieces_that_are_not_whole_steps():
    with pytest.raises(ValueError, match="whole number"):
        S.Quantizer(starts=(0.0, 1.0), steps=(0.3, 0.25), max_nats=80.0)


VERSIONS = [2, 3]
ADVERSARIAL_LAYOUTS = [S.Layout(vocab_size=v, format_version=version)
                       for version in VERSIONS for v in (1, 2, 256, 257, 65536, 65537)]


@pytest.mark.parametrize("layout", ADVERSARIAL_LAYOUTS, ids=lambda l: f"v{l.format_version}-V{l.vocab_size}")
def test_kernels_match_references_on_adversarial_positions(layout):
    V = layout.vocab_size
    top = V - 1
    groups = [
        ([top], [0.0]),                                   # k=1, p=1, id = V-1
        ([0], [-1e-9]),                                   # p just under 1
        ([top], [-np.inf]),                               # p = 0: clipped to max_nats
        ([0], [-200.0]),                                  # far below max_nats
        ([], []),                                         # a position with no stored ids
    ]
    if V >= 4:
        groups += [
            ([3, 1, top, 2], [-0.5, -0.5, -0.5, -0.5]),   # four-way tie, unsorted ids
            ([top, 0, 1], [-1e-7, -30.0, -30.0 - 1e-6]),  # quantisation makes a tie
            ([2, top], [-9.2103, -9.5]),                  # around the fine/coarse boundary
        ]
    groups = groups + groups[::-1]  # the same sets again: references to earlier positions
    offsets, ids, lps = _csr(groups)
    ctx = _contexts(len(groups), np.random.default_rng(0), n_tokens=min(V, 2))
    row_positions = np.array([0, 2, 2, len(groups)], np.int64)  # includes a row with no positions
    got = codec.encode_targets(row_positions, offsets, ids, lps, None, ctx, layout)
    _assert_same_streams(got, codec.encode_targets_reference(row_positions, offsets, ids, lps, None, ctx, layout))
    sizes = np.diff(offsets).astype(np.uint16)
    dec = codec.decode_targets(sizes, row_positions, ctx, got, layout)
    ref = codec.decode_targets_reference(sizes, row_positions, ctx, got, layout)
    for a, b in zip(dec[:3], ref[:3]):
        np.testing.assert_array_equal(a, b)
    q = layout.quantizer
    for want, have in zip(_as_sets(offsets, ids, lps), _as_sets(*dec[:3])):
        assert want.keys() == have.keys()
        for i, (lp, _) in want.items():
            x = min(-lp, q.max_nats)
            assert abs(-x - have[i][0]) <= q.max_error(x) + 1e-6


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sampled", [False, True])
def test_kernels_match_references_on_random_batches(sampled, version):
    rng = np.random.default_rng(7)
    layout = S.Layout(vocab_size=50_000, sampled=sampled, format_version=version)
    batch = random_batch(rng, layout, [40, 0, 17, 33], k=None if sampled else 16)
    for p in range(batch.num_positions // 2, batch.num_positions):  # a small id range: references hit
        a, b = batch.target_offsets[p], batch.target_offsets[p + 1]
        batch.target_ids[a:b] = rng.choice(60, b - a, replace=False)
    rp = positions_of_rows(batch.target_mask, batch.row_offsets)
    ctx = references.position_contexts(rng.integers(0, 4, batch.num_tokens), batch.target_mask, batch.row_offsets)
    args = (rp, batch.target_offsets, batch.target_ids, batch.target_logprobs, batch.target_counts, ctx, layout)
    got = codec.encode_targets(*args)
    _assert_same_streams(got, codec.encode_targets_reference(*args))
    assert np.unpackbits(got.hits).mean() > 0.05  # hits and ranks are exercised
    assert got.refs[batch.num_positions if version == 3 else 0:].max() > 0
    sizes = np.diff(batch.target_offsets).astype(np.uint16)
    dec = codec.decode_targets(sizes, rp, ctx, got, layout)
    ref = codec.decode_targets_reference(sizes, rp, ctx, got, layout)
    for a, b in zip(dec, ref):
        np.testing.assert_array_equal(a, b)
    want = _as_sets(batch.target_offsets, batch.target_ids, batch.target_logprobs, batch.target_counts)
    have = _as_sets(*dec)
    for w, h in zip(want, have):
        assert w.keys() == h.keys()
        assert all(w[i][1] == h[i][1] for i in w)  # counts exact


@st.composite
def _rows(draw):
    V = draw(st.sampled_from([1, 2, 3, 255, 256, 257, 8192, 65536, 65537, 150_000]))
    sampled = draw(st.booleans())
    layout = S.Layout(vocab_size=V, sampled=sampled, format_version=draw(st.sampled_from(VERSIONS)))
    n_rows = draw(st.integers(0, 4))
    groups, row_sizes = [], []
    for _ in range(n_rows):
        n_pos = draw(st.integers(0, 5))
        row_sizes.append(n_pos)
        for _ in range(n_pos):
            k = draw(st.integers(0, min(V, 12)))
            ids = draw(st.lists(st.integers(0, V - 1), min_size=k, max_size=k, unique=True))
            special = st.sampled_from([0.0, -1e-12, -1e-4, -9.21, -9.5, -30.0, -79.99, -80.0, -500.0, -np.inf])
            lps = draw(st.lists(st.one_of(special, st.floats(-100.0, 0.0)), min_size=k, max_size=k))
            groups.append((ids, lps))
    counts = draw(st.lists(st.integers(1, 65535), min_size=sum(len(g[0]) for g in groups),
                           max_size=sum(len(g[0]) for g in groups)))
    n_ctx = min(V, draw(st.integers(1, 4)))
    cur = draw(st.lists(st.integers(0, n_ctx - 1), min_size=len(groups), max_size=len(groups)))
    prev = draw(st.lists(st.integers(-1, n_ctx - 1), min_size=len(groups), max_size=len(groups)))
    return layout, groups, row_sizes, counts, (np.asarray(cur), np.asarray(prev))


@settings(max_examples=300, deadline=None)
@given(_rows())
def test_round_trip_property(case):
    layout, groups, row_sizes, counts, ctx = case
    offsets, ids, lps = _csr(groups)
    counts = np.asarray(counts, np.int64) if layout.sampled else None
    rp = np.concatenate([[0], np.cumsum(row_sizes)]).astype(np.int64)
    streams = codec.encode_targets(rp, offsets, ids, lps, counts, ctx, layout)
    _assert_same_streams(streams, codec.encode_targets_reference(rp, offsets, ids, lps, counts, ctx, layout))
    sizes = np.diff(offsets).astype(np.uint16)
    dec = codec.decode_targets(sizes, rp, ctx, streams, layout)
    for a, b in zip(dec, codec.decode_targets_reference(sizes, rp, ctx, streams, layout)):
        np.testing.assert_array_equal(a, b)
    q = layout.quantizer
    for want, have in zip(_as_sets(offsets, ids, lps, counts), _as_sets(*dec)):
        assert want.keys() == have.keys()
        for i, (lp, n) in want.items():
            x = min(-lp, q.max_nats)
            assert abs(-x - have[i][0]) <= q.max_error(x) + 1e-5
            assert have[i][1] == n
        # decoded order: descending log-prob (ties by ascending id)
        order = [(-have[i][0], i) for i in have]
        assert order == sorted(order)


def test_fidelity_on_entries_above_1e4_is_within_002_nats():
    q = S.Quantizer()
    x = np.linspace(0, -np.log(1e-4), 200_001)
    dec = quantizer.logprob_table(q)[quantizer.quantize_reference(-x, q)]
    assert np.abs(-x - dec).max() <= 0.02


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_refuses_bad_targets(version):
    layout = S.Layout(vocab_size=10, format_version=version)
    rp = np.array([0, 1])
    ctx = (np.array([1]), np.array([-1]))
    for ids, lps, problem in [([3, 3], [-1.0, -2.0], "same id twice"), ([10], [-1.0], "outside the vocabulary"),
                              ([-1], [-1.0], "outside the vocabulary"), ([1], [np.nan], "NaN or positive"),
                              ([1], [0.5], "NaN or positive")]:
        offsets, ids, lps = _csr([(ids, lps)])
        with pytest.raises(CacheFormatError, match=problem):
            codec.encode_targets(rp, offsets, ids, lps, None, ctx, layout)
    offsets, ids, lps = _csr([([1], [-1.0])])
    with pytest.raises(CacheFormatError, match="draw count"):
        codec.encode_targets(rp, offsets, ids, lps, np.array([0]), ctx,
                             S.Layout(vocab_size=10, sampled=True, format_version=version))
    with pytest.raises(CacheFormatError, match="context token"):
        codec.encode_targets(rp, offsets, ids, lps, None, (np.array([10]), np.array([-1])), layout)
    with pytest.raises(CacheFormatError, match="target_offsets: offsets must rise from 0 to 1"):
        codec.encode_targets(rp, np.array([0, 5]), ids, lps, None, ctx, layout)
    with pytest.raises(ValueError, match="at most 2"):
        S.Quantizer(starts=(0.0,), steps=(1e-5,))


CTX = (np.array([1, 2, 1]), np.array([-1, 1, -1]))
V2 = S.Layout(vocab_size=10, format_version=2)


def _encoded(layout, sampled_counts=None):
    """Two rows; the third position refers back to the first (same context) and hits 5 and 9."""
    offsets, ids, lps = _csr([([5, 9, 2], [-0.1, -3.0, -3.0]), ([7], [-200.0]), ([9, 5, 1], [-0.2, -2.0, -4.0])])
    rp = np.array([0, 2, 3], np.int64)
    return offsets, rp, codec.encode_targets(rp, offsets, ids, lps, sampled_counts, CTX, layout)


@pytest.mark.parametrize("damage, problem", [
    (lambda s: setattr(s, "values", s.values[:-1]) or s.value_offsets.__setitem__(-1, len(s.values)),
     "ends early|malformed|beyond"),
    (lambda s: setattr(s, "values", np.concatenate([s.values, [0]])) or
     s.value_offsets.__setitem__(-1, len(s.values)), "left over"),
    (lambda s: s.values.__setitem__(0, 0xFF), "malformed|ends early|beyond"),
    (lambda s: s.values.__setitem__(0, 0xFF) or s.values.__setitem__(1, 0x7F), "beyond the quantiser"),
    (lambda s: setattr(s, "ids", s.ids[:-1]), "more or fewer symbols|whole number"),
    (lambda s: s.ids.__setitem__(slice(None), 0xFF), "outside the vocabulary"),
    (lambda s: s.value_offsets.__setitem__(-1, 10**9), "offsets of the target streams are inconsistent"),
    (lambda s: s.refs.__setitem__(-2, 0x7F), "outside its reference list"),
    (lambda s: s.hits.__setitem__(-1, 0b001), "more or fewer symbols"),  # a hit turned into a miss
    (lambda s: s.hits.__setitem__(-1, 0b111), "runs past its stream"),  # a miss into a hit: no rank left
    (lambda s: s.hits.__setitem__(-1, 0b1011), "bits set past the row's last entry"),
    (lambda s: s.hits.__setitem__(0, 0b001), "marked a hit but its position has no reference"),
    (lambda s: setattr(s, "hits", s.hits[:-1]) or setattr(s, "hit_offsets", np.array([0, 1, 1])),
     "bitmap's length does not match"),
])
def test_version2_decode_refuses_damaged_streams(damage, problem):
    layout = V2
    offsets, rp, streams = _encoded(layout)
    streams.ids = streams.ids.copy()
    streams.values = streams.values.copy()
    streams.hits = streams.hits.copy()
    streams.refs = streams.refs.copy()
    # the last position hits 9 (rank 2 in the first position's [5, 2, 9]) and then 5 (rank 0); 1 misses
    assert streams.hits.tolist() == [0, 0b011] and streams.refs.tolist() == [2, 0]
    damage(streams)
    if streams.id_offsets[-1] != len(streams.ids):
        streams.id_offsets = streams.id_offsets.copy()
        streams.id_offsets[-1] = len(streams.ids)
    with pytest.raises(CacheCorruptError, match=problem):
        codec.decode_targets(np.diff(offsets).astype(np.uint16), rp, CTX, streams, layout, where="shard.arrow")


@pytest.mark.parametrize("layout", [V2, S.Layout(vocab_size=10)], ids=["v2", "v3"])
def test_decode_refuses_huge_declared_sizes(layout):
    offsets, rp, streams = _encoded(layout)
    sizes = np.array([65535, 65535, 65535], np.uint16)  # a hostile length: must not read out of bounds
    with pytest.raises(CacheCorruptError, match="beyond the quantiser|runs past|bitmap.s length|segments"):
        codec.decode_targets(sizes, rp, CTX, streams, layout)


@pytest.mark.parametrize("version", VERSIONS)
def test_damaged_count_stream_is_refused(version):
    layout = S.Layout(vocab_size=10, sampled=True, format_version=version)
    offsets, rp, streams = _encoded(layout, np.array([1, 2, 3, 4, 5, 6, 7]))
    streams.counts = streams.counts[:-1]
    streams.count_offsets = np.minimum(streams.count_offsets, len(streams.counts))  # the last row's lists end there
    with pytest.raises(CacheCorruptError, match="count stream"):
        codec.decode_targets(np.diff(offsets).astype(np.uint16), rp, CTX, streams, layout)




def test_rank_select_helpers_match_plain_python():
    """The decoder finds a hit's id by selecting the set bit of a given rank in a word of unused-entry
    flags: both selects (BMI2 pdep where the CPU has it, the portable one everywhere) against a loop."""
    select_portable = numba.njit(lambda x, r: codec_bits._select_bit_portable(x, r))
    take_rank = numba.njit(lambda words, m: codec_bits.take_rank(words, m))
    take_unused = numba.njit(lambda words, n, r: codec_bits.take_unused(words, n, r))
    selects = [select_portable] + ([numba.njit(lambda x, r: codec_bits._select_bit_bmi2(x, r))] if codec_bits.HAS_BMI2 else [])
    rng = np.random.default_rng(3)
    words = [0xFFFFFFFFFFFFFFFF, 1, 1 << 63, 0x8000000000000001] + [int(w) for w in rng.integers(0, 2**63, 300)]
    for x in words:
        bits = [i for i in range(64) if x >> i & 1]
        for r in range(len(bits)):
            for select in selects:
                assert select(np.uint64(x), r) == bits[r]
    for n in (1, 63, 64, 65, 200):  # take ids of a list of n entries in a random order, by rank and back
        unused = list(range(n))
        a = np.zeros(5, np.uint64)
        b = np.zeros(5, np.uint64)
        codec_bits.fill_unused.py_func(a, n)
        codec_bits.fill_unused.py_func(b, n)
        for m in rng.permutation(n):
            rank = unused.index(m)
            assert take_rank(a, m) == rank
            assert take_unused(b, (n + 63) // 64, rank) == m
            unused.remove(m)
        assert not a.any() and not b.any()
        assert take_unused(b, (n + 63) // 64, 0) == -1  # nothing left to take


def test_encoder_sort_handles_any_order():
    """The encoder's insertion sort (hands over to a quicksort when the input is far from sorted)."""
    rng = np.random.default_rng(4)
    for keys in (np.arange(64), np.arange(64)[::-1], rng.integers(0, 50, 300), np.sort(rng.integers(0, 9, 64)),
                 np.r_[np.arange(60), [3, 1, 70, 2]], np.zeros(0, np.int64), np.array([5])):
        keys = np.asarray(keys, np.int64)
        got = keys.copy()
        codec2.sort_nearly_sorted(got)
        np.testing.assert_array_equal(got, np.sort(keys))


PORTABLE_ROUND_TRIP = """
import sys
import numpy as np
from teachercache.format import bits, codec, schema as S
assert not bits.HAS_BMI2
rng = np.random.default_rng(8)
layout = S.Layout(vocab_size=300, format_version=int(sys.argv[1]))
groups = [rng.choice(40, 12, replace=False) for _ in range(200)]  # few ids: many entries are hits
offsets = np.arange(201) * 12
ids = np.concatenate(groups)
lps = -rng.random(len(ids)).astype(np.float32) * 6
rp = np.array([0, 120, 200])
ctx = (rng.integers(0, 3, 200), np.where(np.arange(200) % 120 == 0, -1, rng.integers(0, 3, 200)))
streams = codec.encode_targets(rp, offsets, ids, lps, None, ctx, layout)
got = codec.decode_targets(np.full(200, 12, np.uint16), rp, ctx, streams, layout)
want = codec.decode_targets_reference(np.full(200, 12, np.uint16), rp, ctx, streams, layout)
assert np.unpackbits(streams.hits).mean() > 0.2 and streams.refs[200 if layout.format_version == 3 else 0:].max() > 3
for a, b in zip(got[:3], want[:3]):
    np.testing.assert_array_equal(a, b)
print("ok")
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_decoder_without_bmi2_compiles_and_matches_the_reference(tmp_path, version):
    """NUMBA_CPU_NAME=generic makes numba target a CPU without BMI2 (as on ARM): the decoder then finds a
    hit's id with the portable select, in a fresh process with its own numba cache."""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    proc = subprocess.run([sys.executable, "-c", PORTABLE_ROUND_TRIP, str(version)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
