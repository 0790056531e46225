"""student.dataset and student.collate on small real caches: every row exactly once per epoch across ranks
and DataLoader worker processes, a seeded shuffle, exact resume, and collated StudentBatches equal to what
the cache reader decodes."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import random_batch, write_cache

from teachercache.student.collate import IGNORE_INDEX, StudentBatch, TokenBatch, collate_rows, collate_tokens
from teachercache.student.dataset import CacheDataset, consumer_rows, make_loader, rows_delivered, shuffle_buffer_order
from teachercache.student.losses import SparseTargets
from teachercache.errors import CacheError, CacheFormatError
from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[2]
PAD = 7


def valid_batch(rng, layout: S.Layout, lengths, k: int | None = 4, mask_prob: float = 0.9):
    """random_batch without a target on any row's last token (its next token is not in the row), as the
    teacher pass writes them."""
    b = random_batch(rng, layout, lengths, k=k, mask_prob=mask_prob)
    ends = b.row_offsets[1:] - 1
    marked = ends[b.target_mask[ends]]
    keep = np.ones(b.num_positions, bool)
    keep[np.cumsum(b.target_mask)[marked] - 1] = False               # (P,) positions that stay
    sizes = np.diff(b.target_offsets)
    keep_entries = np.repeat(keep, sizes)
    b.target_mask = b.target_mask.copy()
    b.target_mask[ends] = False
    b.target_offsets = np.concatenate([[0], np.cumsum(sizes[keep])]).astype(np.int64)
    b.target_ids, b.target_logprobs = b.target_ids[keep_entries], b.target_logprobs[keep_entries]
    if b.target_counts is not None:
        b.target_counts = b.target_counts[keep_entries]
    b.label_logprob, b.rest_mass, b.entropy = b.label_logprob[keep], b.rest_mass[keep], b.entropy[keep]
    b.hidden = {layer: h[keep] for layer, h in b.hidden.items()}
    return b


# Record batches of 1..9 rows (and an empty one) over three shards: 61 rows.
BATCH_SIZES = [3, 1, 5, 0, 2, 9, 4, 1, 7, 6, 3, 8, 2, 5, 1, 4]
LAYOUT = S.Layout(vocab_size=300, sampled=True, hidden_layers=(0, 2), hidden_width=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A sampled cache with hidden layers 0 and 2, several shards, record batches of varying size."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "cache"
    batches = [valid_batch(rng, LAYOUT, rng.integers(1, 13, n), k=None) for n in BATCH_SIZES]
    write_cache(path, batches, LAYOUT, shard_bytes=3000)
    return path


@pytest.fixture(scope="module")
def reference(cache_dir) -> dict:
    """Row index -> the row as Cache.iter_batches decodes it (the reader the dataset is checked against)."""
    rows, g = {}, 0
    for b in Cache.open(cache_dir).iter_batches():
        for r in range(b.num_rows):
            p0, p1 = b.row_positions[r], b.row_positions[r + 1]
            e0, e1 = b.target_offsets[p0], b.target_offsets[p1]
            rows[g] = dict(input_ids=b.input_ids[b.row_offsets[r]:b.row_offsets[r + 1]],
                           target_mask=b.target_mask[b.row_offsets[r]:b.row_offsets[r + 1]],
                           target_offsets=b.target_offsets[p0:p1 + 1] - e0, target_ids=b.target_ids[e0:e1],
                           target_logprobs=b.target_logprobs[e0:e1],
                           target_counts=None if b.target_counts is None else b.target_counts[e0:e1],
                           label_logprob=b.label_logprob[p0:p1], rest_mass=b.rest_mass[p0:p1],
                           hidden={layer: h[p0:p1] for layer, h in b.hidden.items()})
            g += 1
    return rows


def loader_rows(ds, batch_size=4, workers=0) -> list[list[int]]:
    """row_index of every batch a make_loader DataLoader delivers (worker processes forked)."""
    kw = {"multiprocessing_context": "fork"} if workers else {}
    loader = make_loader(ds, batch_size, workers, partial(collate_rows, pad_id=PAD), **kw)
    return [b.row_index.tolist() for b in loader]


def test_cache_fixture_has_several_shards(cache_dir):
    cache = Cache.open(cache_dir)
    assert len(cache.shards) >= 3 and cache.manifest.totals.rows == sum(BATCH_SIZES)
    ds = CacheDataset(cache_dir, rank=0, world_size=1)
    assert [len(r) for r in ds.batch_rows] and np.concatenate(ds.batch_rows).tolist() == BATCH_SIZES


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_every_row_exactly_once_per_epoch(cache_dir, world, workers):
    n = sum(BATCH_SIZES)
    for shuffle, epoch in ((False, 0), (True, 3)):
        seen = []
        for rank in range(world):
            ds = CacheDataset(cache_dir, rank=rank, world_size=world, shuffle=shuffle, shuffle_buffer=5, seed=1)
            ds.set_epoch(epoch)
            got = [g for batch in loader_rows(ds, 3, workers) for g in batch]
            assert len(got) == ds.rank_rows
            if not shuffle:  # file order: rank r holds the rows g with g mod world = r
                assert all(g % world == rank for g in got)
            seen += got
        assert sorted(seen) == list(range(n))
    ds = CacheDataset(cache_dir, rank=0, world_size=1, shuffle=False)
    assert [g for b in loader_rows(ds, 5, 0) for g in b] == list(range(n))


def test_consumers_partition_the_stream_and_skip_batches_without_their_rows():
    lengths = np.array([1, 1, 1, 1, 3, 0, 2, 5, 1])
    items = []
    for consumer in range(4):
        batch, row = consumer_rows(lengths, consumer, 4)
        starts = np.cumsum(lengths) - lengths
        assert ((starts[batch] + row) % 4 == consumer).all() and (row < lengths[batch]).all()
        items += (starts[batch] + row).tolist()
    assert sorted(items) == list(range(lengths.sum()))
    batch, _ = consumer_rows(lengths, 1, 4)
    assert sorted(set(batch.tolist())) == [1, 4, 7]  # one-row batches 0, 2, 3, 8 hold none of its rows


def test_shuffle_buffer_order():
    out = shuffle_buffer_order(100, 8, np.random.default_rng(0))
    assert sorted(out.tolist()) == list(range(100))
    assert (out <= np.arange(100) + 8).all()  # never needs more than the buffer's items ahead
    assert out.tolist() != list(range(100))
    assert out.tolist() == shuffle_buffer_order(100, 8, np.random.default_rng(0)).tolist()
    assert sorted(shuffle_buffer_order(5, 8, np.random.default_rng(1)).tolist()) == list(range(5))
    assert [rows_delivered(5, 4, w, 2) for w in (0, 1)] == [12, 8]
    assert [rows_delivered(1, 4, w, 3) for w in (0, 1, 2)] == [4, 0, 0]


def test_shuffle_is_deterministic_per_seed_and_epoch(cache_dir):
    def order(seed, epoch, rank=0, world=1):
        ds = CacheDataset(cache_dir, rank=rank, world_size=world, seed=seed, shuffle_buffer=6)
        ds.set_epoch(epoch)
        return [row["row_index"] for row in ds]

    n = sum(BATCH_SIZES)
    first = order(0, 0)
    assert sorted(first) == list(range(n)) and first != list(range(n))
    assert order(0, 0) == first                   # same (seed, epoch): same order, from a fresh dataset
    assert order(0, 1) != first and sorted(order(0, 1)) == list(range(n))
    assert order(1, 0) != first
    # the epoch's record-batch order is shared by the ranks: their rows still partition the cache
    assert sorted(order(0, 2, 0, 2) + order(0, 2, 1, 2)) == list(range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_set_position_resumes_with_exactly_the_remaining_batches(cache_dir, workers):
    def run(consumed=None):
        ds = CacheDataset(cache_dir, rank=1, world_size=2, seed=5, shuffle_buffer=4)
        ds.set_epoch(2)
        if consumed is not None:
            ds.set_position(2, consumed, 4)
        return loader_rows(ds, 4, workers)

    whole = run()
    assert len(whole) >= 6 and len(whole[-1]) < 4  # 30 rows: a short batch at the end of the epoch
    for consumed in (0, 1, 4, len(whole) - 1, len(whole)):
        assert run(consumed) == whole[consumed:], consumed
    ds = CacheDataset(cache_dir, rank=1, world_size=2, seed=5, shuffle_buffer=4)
    ds.set_position(2, 4, 4)
    ds.set_epoch(3)  # another epoch: the position no longer applies
    assert len([row for row in ds]) == ds.rank_rows


def assert_matches(batch: StudentBatch, reference: dict, hidden_layers=()):
    """Every tensor of a collated batch against the rows as the cache reader decodes them."""
    assert isinstance(batch, StudentBatch)
    B, T = batch.input_ids.shape
    pos, ent = 0, 0
    flat = []
    for b, g in enumerate(batch.row_index.tolist()):
        ref = reference[g]
        n, p = len(ref["input_ids"]), len(ref["rest_mass"])
        assert batch.input_ids[b, :n].tolist() == ref["input_ids"].tolist()
        assert (batch.input_ids[b, n:] == PAD).all() and batch.attention_mask[b].sum() == n
        assert batch.loss_mask[b, :n].tolist() == ref["target_mask"].tolist() and not batch.loss_mask[b, n:].any()
        ts = np.flatnonzero(ref["target_mask"])
        want = np.full(T, -100)
        want[ts] = ref["input_ids"][ts + 1]       # the NEXT token
        assert batch.labels[b].tolist() == want.tolist()
        flat += (b * T + ts).tolist()
        e = len(ref["target_ids"])
        offs = batch.target_offsets[pos:pos + p + 1] - batch.target_offsets[pos]
        assert offs.tolist() == ref["target_offsets"].tolist() and int(batch.target_offsets[pos]) == ent
        assert batch.target_ids[ent:ent + e].tolist() == ref["target_ids"].tolist()
        np.testing.assert_array_equal(batch.target_logprobs[ent:ent + e].numpy(), ref["target_logprobs"])
        if ref["target_counts"] is None:
            assert batch.target_counts is None
        else:
            assert batch.target_counts[ent:ent + e].tolist() == ref["target_counts"].tolist()
        np.testing.assert_array_equal(batch.rest_mass[pos:pos + p].numpy(), ref["rest_mass"])
        np.testing.assert_array_equal(batch.label_logprob[pos:pos + p].numpy(), ref["label_logprob"])
        for layer in hidden_layers:
            np.testing.assert_array_equal(batch.hidden[layer][pos:pos + p].numpy(), ref["hidden"][layer])
        pos, ent = pos + p, ent + e
    assert batch.target_positions.tolist() == flat and int(batch.loss_mask.sum()) == pos == batch.num_positions
    assert len(batch.target_offsets) == pos + 1 and int(batch.target_offsets[-1]) == ent
    assert sorted(batch.hidden) == sorted(hidden_layers)
    assert batch.input_ids.dtype == torch.long and batch.target_logprobs.dtype == torch.float32


def test_collated_batches_equal_the_decoded_cache(cache_dir, reference):
    ds = CacheDataset(cache_dir, rank=0, world_size=1, seed=3, hidden_layers=[2])
    assert S.hidden_column(2) in ds.columns and S.hidden_column(0) not in ds.columns
    loader = make_loader(ds, 4, 2, partial(collate_rows, pad_id=PAD), multiprocessing_context="fork")
    seen = 0
    for batch in loader:
        assert_matches(batch, reference, hidden_layers=[2])
        assert batch.hidden[2].shape == (batch.num_positions, 4)
        seen += len(batch.row_index)
    assert seen == len(reference)


def test_hidden_columns_are_read_only_when_asked_for(cache_dir, reference):
    ds = CacheDataset(cache_dir, rank=0, world_size=1, shuffle=False)
    assert not [c for c in ds.columns if c.startswith(S.HIDDEN_PREFIX)] and S.ENTROPY not in ds.columns
    rows = list(ds)
    assert all("hidden" not in row for row in rows)
    batch = collate_rows(rows[:6], pad_id=PAD)
    assert batch.hidden == {}
    assert_matches(batch, reference)
    with pytest.raises(CacheError, match=r"hidden layers \[5\] are not stored in this cache \(stored: 0, 2\)"):
        CacheDataset(cache_dir, rank=0, world_size=1, hidden_layers=[5])


@pytest.mark.parametrize("sampled", [False, True])
def test_sparse_targets_are_the_rows_targets_concatenated(tmp_path, sampled):
    """collate_rows(...).sparse_targets() against SparseTargets built by hand from the rows, for a top-k
    and a sampled cache (rows without any target position included)."""
    rng = np.random.default_rng(7)
    layout = S.Layout(vocab_size=120, sampled=sampled)
    batches = [valid_batch(rng, layout, rng.integers(1, 9, 4), k=None if sampled else 5, mask_prob=0.7)
               for _ in range(3)]
    write_cache(tmp_path / "cache", batches, layout)
    rows = list(CacheDataset(tmp_path / "cache", rank=0, world_size=1, shuffle=False))
    assert any(len(r["rest_mass"]) == 0 for r in rows) and len(rows) == 12
    for chunk in (rows[:5], rows[5:], rows[3:4]):
        offsets, ids, logprobs, rest, counts = [0], [], [], [], []
        for r in chunk:   # each row's local offsets, shifted by the entries of the rows before it
            offsets += [offsets[-1] + int(o) for o in r["target_offsets"][1:]]
            ids += r["target_ids"].tolist()
            logprobs += r["target_logprobs"].tolist()
            rest += r["rest_mass"].tolist()
            counts += r["target_counts"].tolist() if sampled else []
        want = SparseTargets(torch.tensor(offsets, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
                             torch.tensor(logprobs, dtype=torch.float32), torch.tensor(rest, dtype=torch.float32),
                             torch.tensor(counts, dtype=torch.float32) if sampled else None)
        batch = collate_rows(chunk, pad_id=PAD)
        for got in (batch.sparse_targets(), batch.sparse_targets("cpu"), batch.to("cpu").sparse_targets()):
            for name in ("offsets", "ids", "logprobs", "rest"):
                a, b = getattr(got, name), getattr(want, name)
                assert a.dtype == b.dtype and torch.equal(a, b), name
            if sampled:
                assert got.counts.dtype == torch.float32 and torch.equal(got.counts, want.counts)
                assert got.counts.sum() == sum(int(c) for r in chunk for c in r["target_counts"])
            else:
                assert got.counts is None
            assert got.num_positions == batch.num_positions == len(rest)
            assert batch.target_positions.numel() == sum(int(r["target_mask"].sum()) for r in chunk)


def test_text_rows_collate_into_a_token_batch():
    rows = [(np.array([5, 6, 7, 8], np.int32), np.array([True, False, True, True])),   # last token marked
            (np.array([9, 10], np.int32), np.array([True, False]))]
    batch = collate_tokens(rows, pad_id=PAD)
    assert isinstance(batch, TokenBatch)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    I = IGNORE_INDEX
    assert batch.labels.tolist() == [[6, I, 8, I], [10, I, I, I]]   # a row's last token predicts nothing
    assert batch.loss_mask.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert batch.target_positions.tolist() == [0, 2, 4] and batch.num_positions == 3
    assert torch.equal(batch.to("cpu").labels, batch.labels)
    with pytest.raises(ValueError, match="no rows"):
        collate_tokens([])


def test_inconsistent_rows_are_refused(tmp_path, cache_dir):
    rng = np.random.default_rng(1)
    layout = S.Layout(vocab_size=100)
    # every token marked, the last of each row included: a row would predict a token it does not hold
    write_cache(tmp_path / "bad", [random_batch(rng, layout, [5, 4], k=3, mask_prob=1.1)], layout)
    with pytest.raises(CacheFormatError, match=r"part-r000-00000.arrow \(record batch 0, row 0\).*last token"):
        next(iter(CacheDataset(tmp_path / "bad", rank=0, world_size=1)))
    row = next(iter(CacheDataset(cache_dir, rank=0, world_size=1, shuffle=False)))
    row["target_mask"] = row["target_mask"].copy()
    row["target_mask"][np.flatnonzero(row["target_mask"])[0]] = False
    with pytest.raises(CacheFormatError, match="target positions stored but target_mask marks"):
        collate_rows([row])


def test_rows_of_a_real_build_have_next_token_labels(tmp_path):
    """The demo teacher over two short documents of the held-out corpus (8 rows of 32 tokens)."""
    few, out = tmp_path / "few.parquet", tmp_path / "built"
    pq.write_table(pq.read_table(ROOT / "data" / "corpus" / "valid.parquet").slice(2, 2), few)
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(out), batch_size=3, progress=False,
                             targets=TargetSpec(kind="topk", k=8), data=DataOptions(paths=(str(few),), seq_len=32)))
    cache = Cache.open(out)
    reference, g = {}, 0
    for b in cache.iter_batches():
        for r in range(b.num_rows):
            p0, p1 = b.row_positions[r], b.row_positions[r + 1]
            e0, e1 = b.target_offsets[p0], b.target_offsets[p1]
            reference[g] = dict(input_ids=b.input_ids[b.row_offsets[r]:b.row_offsets[r + 1]],
                                target_mask=b.target_mask[b.row_offsets[r]:b.row_offsets[r + 1]],
                                target_offsets=b.target_offsets[p0:p1 + 1] - e0, target_ids=b.target_ids[e0:e1],
                                target_logprobs=b.target_logprobs[e0:e1], target_counts=None,
                                label_logprob=b.label_logprob[p0:p1], rest_mass=b.rest_mass[p0:p1], hidden={})
            g += 1
    assert cache.manifest.totals.rows == g >= 6
    ds = CacheDataset(out, rank=0, world_size=1, shuffle=False)
    seen = []
    for batch in make_loader(ds, 5, 0, partial(collate_rows, pad_id=PAD)):
        assert_matches(batch, reference)
        ids, labels = batch.input_ids, batch.labels
        shifted = torch.where(batch.loss_mask[:, :-1], ids[:, 1:], -100)
        assert torch.equal(labels[:, :-1], shifted) and (labels[:, -1] == -100).all()
        assert batch.loss_mask.sum() > 0 and (labels[batch.loss_mask] >= 0).all()
        seen += batch.row_index.tolist()
    assert seen == list(range(g))
