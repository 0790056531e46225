"""records: RowBatch <-> Arrow record batch, and the small fixed-point and 16-bit float codes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_batch

from teachercache.errors import CacheFormatError
from teachercache.format import schema as S
from teachercache.format.records import decode_batch, decode_float16, encode_batch, encode_float16


def _as_sets(offsets, ids, counts=None):
    return [{(int(i), None if counts is None else int(c)) for i, c in
             zip(ids[a:b], counts[a:b] if counts is not None else [None] * (b - a))}
            for a, b in zip(offsets, offsets[1:])]


@pytest.mark.parametrize("dtype, rtol", [("bfloat16", 2**-8), ("float16", 2**-11)])
def test_float16_hidden_states_round_trip(dtype, rtol):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10).astype(np.float32)
    y = decode_float16(encode_float16(x, dtype), dtype)
    assert np.all(np.abs(y - x) <= rtol * np.abs(x) + 1e-6)
    if dtype == "bfloat16":  # compare with torch's own bfloat16 rounding
        import torch
        want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(y, want)


def test_batch_round_trip_all_columns():
    rng = np.random.default_rng(3)
    layout = S.Layout(vocab_size=3000, sampled=True, hidden_layers=(0, 2), hidden_width=6)
    batch = random_batch(rng, layout, [9, 0, 12, 1], k=None)
    out = decode_batch(encode_batch(batch, layout), layout)
    np.testing.assert_array_equal(out.row_offsets, batch.row_offsets)
    np.testing.assert_array_equal(out.input_ids, batch.input_ids)
    np.testing.assert_array_equal(out.target_mask, batch.target_mask)
    np.testing.assert_array_equal(out.target_sizes, batch.target_sizes)
    assert np.abs(out.label_logprob - batch.label_logprob).max() <= 0.5 / S.NATS16_SCALE + 1e-6
    assert np.abs(out.entropy - batch.entropy).max() <= 0.5 / S.NATS16_SCALE + 1e-6
    assert np.abs(out.rest_mass - batch.rest_mass).max() <= 0.5 / S.REST_SCALE + 1e-7
    for layer in (0, 2):
        np.testing.assert_allclose(out.hidden[layer], batch.hidden[layer], rtol=2**-8, atol=1e-6)
    assert _as_sets(out.target_offsets, out.target_ids, out.target_counts) == \
        _as_sets(batch.target_offsets, batch.target_ids, batch.target_counts)


def test_batch_encode_checks_shapes():
    rng = np.random.default_rng(3)
    layout = S.Layout(vocab_size=100)
    batch = random_batch(rng, layout, [5, 5])
    batch.rest_mass = batch.rest_mass[:-1]
    with pytest.raises(CacheFormatError, match="rest_mass: expected"):
        encode_batch(batch, layout, where="x.arrow")
