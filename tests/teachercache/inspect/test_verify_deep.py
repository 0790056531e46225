"""`teachercache verify --deep`: a sound cache passes (random and real); each planted fault is reported
with its shard, row and position. Faults the writer refuses (an id outside the vocabulary, an id twice
in a position) are planted by encoding the target streams with the codec's unchecked reference encoder
and rewriting the shard and its manifest entry."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from click.testing import CliRunner
from helpers import random_batch, write_cache

from teachercache.cli import main
from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.codec import encode_targets_reference
from teachercache.format.manifest import Totals, write_manifest
from teachercache.format.records import decode_batch, encode_batch, positions_of_rows
from teachercache.format.references import position_contexts
from teachercache.format.shards import ZSTD_LEVEL, file_sha256
from teachercache.inspect.rows import label_ranks, next_tokens
from teachercache.inspect.verify import verify_cache

V = 700
N_DRAWS = 64


def _sound_batch(rng, layout, k=8):
    """random_batch made sound the way a build's batches are: no target on a row's last token, and the
    label log-prob equal to the stored one where the next token is stored."""
    b = random_batch(rng, layout, [16, 16, 9], k=k)
    keep = next_tokens(b) >= 0
    sizes = b.target_sizes[keep]
    entries = np.repeat(keep, b.target_sizes)
    b.target_mask[np.flatnonzero(b.target_mask)[~keep]] = False
    b.target_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    b.target_ids, b.target_logprobs = b.target_ids[entries], b.target_logprobs[entries]
    if b.target_counts is not None:
        b.target_counts = b.target_counts[entries]
    b.label_logprob, b.rest_mass, b.entropy = b.label_logprob[keep], b.rest_mass[keep], b.entropy[keep]
    b.hidden = {layer: h[keep] for layer, h in b.hidden.items()}
    ranks = label_ranks(b)
    stored = np.flatnonzero(ranks)
    b.label_logprob[stored] = b.target_logprobs[b.target_offsets[stored] + ranks[stored] - 1]
    return b


def _sampled_batch(rng, layout):
    """A sound batch with draw counts that sum to N_DRAWS per position, as real sampled targets do."""
    b = _sound_batch(rng, layout, k=None)
    for p in range(b.num_positions):
        lo, hi = b.target_offsets[p], b.target_offsets[p + 1]
        b.target_counts[lo:hi] = 1
        b.target_counts[lo] += N_DRAWS - (hi - lo)
    return b


def _cache(tmp_path, layout):
    rng = np.random.default_rng(5)
    make = _sampled_batch if layout.sampled else _sound_batch
    write_cache(tmp_path / "c", [make(rng, layout) for _ in range(2)], layout)
    return tmp_path / "c"


def _where(batch, p):
    """(row, token index within the row) of target position p of a RowBatch."""
    t = int(np.flatnonzero(batch.target_mask)[p])
    r = int(np.searchsorted(batch.row_offsets, t, "right") - 1)
    return r, t - int(batch.row_offsets[r])


def _plant(cache_dir, mutate, unchecked_streams=False):
    """Decode record batch 0 of shard 0, let ``mutate`` damage it, write it back (shard + manifest)."""
    cache = Cache.open(cache_dir)
    path, layout = cache.shard_path(0), cache.layout
    with ipc.open_stream(pa.memory_map(str(path))) as f:
        records = list(f)
    batch = decode_batch(records[0], layout)
    clean = encode_batch(batch, layout)
    where = mutate(batch)
    if unchecked_streams:  # same sizes and per-position columns; only the streams change
        streams = encode_targets_reference(
            positions_of_rows(batch.target_mask, batch.row_offsets), batch.target_offsets, batch.target_ids,
            batch.target_logprobs, batch.target_counts,
            position_contexts(batch.input_ids, batch.target_mask, batch.row_offsets), layout)
        columns = dict(zip(clean.schema.names, clean.columns))
        for name, (values, offsets) in {S.TARGET_IDS: (streams.ids, streams.id_offsets),
                                        S.TARGET_VALUES: (streams.values, streams.value_offsets),
                                        S.TARGET_HITS: (streams.hits, streams.hit_offsets),
                                        S.TARGET_REFS: (streams.refs, streams.ref_offsets)}.items():
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                     pa.array(values, pa.uint8()))
        records[0] = pa.RecordBatch.from_arrays([columns[n] for n in clean.schema.names], schema=clean.schema)
    else:
        records[0] = encode_batch(batch, layout)
    options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL))
    with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, layout.schema(), options=options) as writer:
        for record in records:
            writer.write_batch(record)
    info = dataclasses.replace(cache.shards[0], bytes=path.stat().st_size, sha256=file_sha256(path))
    shards = [info, *cache.shards[1:]]
    write_manifest(cache_dir, dataclasses.replace(cache.manifest, shards=shards, totals=Totals.of(shards)))
    return where


def _id_out_of_range(batch):
    p = 3
    batch.target_ids[batch.target_offsets[p] + 1] = V + 50
    return _where(batch, p), f"stored id {V + 50} is outside the vocabulary"


def _duplicate_id(batch):
    p = 4
    e = batch.target_offsets[p]
    batch.target_ids[e + 2] = batch.target_ids[e]
    return _where(batch, p), f"stored id {batch.target_ids[e]} appears more than once"


def _mass_above_one(batch):
    p = 6
    batch.rest_mass[p] = 1.0  # the stored ids already hold more than half the mass
    return _where(batch, p), "stored mass + rest mass = 1."


def _wrong_count_sum(batch):
    p = 2
    batch.target_counts[batch.target_offsets[p]] += 3
    return _where(batch, p), f"draw counts sum to {N_DRAWS + 3}, targets.samples is {N_DRAWS}"


def _nan_hidden(batch):
    p = 5
    batch.hidden[1][p, 2] = np.nan
    return _where(batch, p), "hidden_1: non-finite values"


CASES = {
    "id-out-of-range": (S.Layout(vocab_size=V), _id_out_of_range, True),
    "duplicate-id": (S.Layout(vocab_size=V), _duplicate_id, True),
    "mass-above-one": (S.Layout(vocab_size=V), _mass_above_one, False),
    "wrong-count-sum": (S.Layout(vocab_size=V, sampled=True), _wrong_count_sum, False),
    "nan-hidden-state": (S.Layout(vocab_size=V, hidden_layers=(1,), hidden_width=4), _nan_hidden, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deep_verify_finds_each_planted_fault(tmp_path, case):
    layout, mutate, unchecked = CASES[case]
    cache = _cache(tmp_path, layout)
    assert verify_cache(cache, deep=True) == []  # sound before
    (row, position), problem = _plant(cache, mutate, unchecked)
    assert verify_cache(cache) == []  # checksums and counts cannot see it
    faults = verify_cache(cache, deep=True)
    hits = [f for f in faults if f.row == row and f.position == position and problem in f.problem]
    assert hits, faults
    assert hits[0].file.endswith(Cache.open(cache).shards[0].file)
    result = CliRunner().invoke(main, ["verify", "--deep", str(cache)])
    assert result.exit_code == 1 and f"row {row} position {position}: " in result.output


def test_a_real_cache_passes_deep_verify(demo_cache, tmp_path):
    assert verify_cache(demo_cache, deep=True) == []
    result = CliRunner().invoke(main, ["verify", "--deep", str(demo_cache)])
    assert result.exit_code == 0 and "OK" in result.output
    copy = tmp_path / "copy"
    shutil.copytree(demo_cache, copy)
    (row, position), problem = _plant(copy, _mass_above_one)
    assert any(f.row == row and f.position == position for f in verify_cache(copy, deep=True))
