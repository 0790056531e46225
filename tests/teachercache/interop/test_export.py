"""Export to Axolotl's KD columns and to a Hugging Face datasets directory, checked against the
pyarrow-only decoder of docs/FORMAT.md on a real cache; and a shard opened by pyarrow and by datasets
with no teachercache code."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from teachercache.cli import main
from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.records import decode_batch
from teachercache.interop.export import PAD_LOGPROB, ExportError, ExportOptions, export_cache


def test_axolotl_columns_hold_exactly_the_caches_targets(demo_cache, doc_rows, tmp_path):
    out = tmp_path / "kd.parquet"
    result = CliRunner().invoke(main, ["export", str(demo_cache), "--format", "axolotl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == ["input_ids", "labels", "target_token_ids", "target_logprobs", "target_mask"]
    raw = export_cache(demo_cache, tmp_path / "raw.parquet", ExportOptions(renormalize=False))
    raw_table = pq.read_table(tmp_path / "raw.parquet")
    refs = doc_rows(demo_cache)
    assert table.num_rows == raw == len(refs) == Cache.open(demo_cache).manifest.totals.rows
    for r, ref in enumerate(refs):
        row = {name: table.column(name)[r].as_py() for name in table.column_names}
        raw_lps = raw_table.column("target_logprobs")[r].as_py()
        T = len(ref["input_ids"])
        assert row["input_ids"] == ref["input_ids"]
        assert len(row["target_token_ids"]) == len(row["target_logprobs"]) == len(row["target_mask"]) == T
        targets = dict(zip(ref["target_positions"], ref["targets"]))
        for t in range(T):
            mask = row["target_mask"][t]
            want_label = ref["input_ids"][t] if t > 0 and (t - 1) in targets else -100
            assert row["labels"][t] == want_label
            if t not in targets:
                assert sum(mask) == 0 and set(row["target_logprobs"][t]) == {PAD_LOGPROB}
                continue
            ids, lps, _ = targets[t]
            n = len(ids)
            assert mask == [1] * n + [0] * (len(mask) - n)
            assert row["target_token_ids"][t][:n] == ids
            renorm = np.asarray(lps) - np.logaddexp.reduce(np.asarray(lps))
            np.testing.assert_allclose(row["target_logprobs"][t][:n], renorm, atol=1e-5)
            assert np.exp(row["target_logprobs"][t][:n]).sum() == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(raw_lps[t][:n], lps, atol=1e-6)
    with pytest.raises(ExportError, match="--overwrite"):
        export_cache(demo_cache, out)


def test_hf_export_is_the_decoded_cache(demo_cache, doc_rows, tmp_path):
    import datasets

    out = tmp_path / "hf"
    result = CliRunner().invoke(main, ["export", str(demo_cache), "--format", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ds = datasets.load_from_disk(str(out))
    refs = doc_rows(demo_cache)
    assert len(ds) == len(refs)
    for row, ref in zip(ds, refs):
        assert row["input_ids"] == ref["input_ids"] and row["positions"] == ref["target_positions"]
        assert row["target_token_ids"] == [ids for ids, _, _ in ref["targets"]]
        for got, (_, lps, _) in zip(row["target_logprobs"], ref["targets"]):
            np.testing.assert_allclose(got, lps, atol=1e-6)
        np.testing.assert_allclose(row["rest_mass"], ref["rest_mass"], atol=1e-6)
        np.testing.assert_allclose(row["label_logprob"], ref["label_logprob"], atol=1e-6)


def test_a_shard_opens_with_pyarrow_alone_and_with_datasets(demo_cache, tmp_path):
    import datasets

    cache = Cache.open(demo_cache)
    path = str(cache.shard_path(0))
    table = ipc.open_stream(pa.memory_map(path)).read_all()  # pyarrow alone
    assert table.num_rows == cache.shards[0].rows
    assert table.column_names == cache.layout.columns()
    sizes = pa.compute.list_flatten(table.column(S.TARGET_SIZES)).to_numpy()
    assert sizes.sum() == cache.shards[0].target_entries
    ds = datasets.Dataset(table)  # the same table as a datasets.Dataset, zero copies of the mapped file
    assert ds.num_rows == table.num_rows and ds[0][S.INPUT_IDS] == table.column(S.INPUT_IDS)[0].as_py()
    # Dataset.from_file memory-maps an Arrow IPC stream, which is what a shard is
    mapped = datasets.Dataset.from_file(path)
    assert mapped.column_names == table.column_names and mapped.num_rows == table.num_rows
    for name in (S.INPUT_IDS, S.TARGET_MASK, S.TARGET_IDS, S.REST_MASS):
        assert mapped[name] == table.column(name).to_pylist()
    # and the decoded targets of a row read through datasets equal the library's own decoding
    with cache.open_shard(0) as reader:
        rows = reader.read_record_batch(0).num_rows
        want = reader.read_batch(0)
    record = pa.RecordBatch.from_pylist(mapped.select(range(rows)).to_list(), schema=cache.layout.schema())
    got = decode_batch(record, cache.layout)
    np.testing.assert_array_equal(got.target_ids, want.target_ids)
    np.testing.assert_array_equal(got.target_logprobs, want.target_logprobs)
    # load_dataset's "arrow" builder falls back to the IPC file reader: shards load as they are
    loaded = datasets.load_dataset("arrow", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.column_names == table.column_names and loaded.num_rows == table.num_rows
    for name in (S.INPUT_IDS, S.TARGET_SIZES, S.REST_MASS):
        assert loaded[name] == table.column(name).to_pylist()
