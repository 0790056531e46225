"""Caches of format version 2 keep opening and decoding: two caches written by the last release that wrote
version 2 (tests/fixtures/make_cache_v2.py says how) against the rows that release decoded them to; today's
version 2 encoder writes the same streams; the same rows written in version 3 decode to the same arrays;
`verify` passes both; and a shard whose version differs from its manifest's is refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from teachercache.errors import CacheFormatError
from teachercache.format import schema as S
from teachercache.format.cache import Cache, CacheWriter
from teachercache.format.records import encode_batch
from teachercache.inspect.verify import verify_cache

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
CACHES = ["cache_v2_topk", "cache_v2_sampled_3byte"]
FIELDS = ("row_offsets", "input_ids", "target_mask", "target_offsets", "target_ids", "target_logprobs",
          "target_counts", "label_logprob", "rest_mass", "entropy")


def _expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "expected.npz", allow_pickle=False) as f:
        return dict(f)


def _assert_decodes_to(cache: Cache, expected: dict[str, np.ndarray]) -> None:
    n = 0
    for i, batch in enumerate(cache.iter_batches()):
        for field in FIELDS:
            key = f"{i}.{field}"
            if key in expected:
                np.testing.assert_array_equal(getattr(batch, field), expected[key], err_msg=key)
            else:
                assert getattr(batch, field) is None, key
        n += 1
    assert n == 2


@pytest.mark.parametrize("name", CACHES)
def test_version2_fixture_opens_and_decodes_as_its_release_did(name):
    cache = Cache.open(FIXTURES / name)
    assert cache.manifest.format_version == 2 and cache.layout.format_version == 2
    assert cache.layout.id_bytes == (3 if "3byte" in name else 2)
    _assert_decodes_to(cache, _expected(name))
    assert verify_cache(FIXTURES / name, deep=True) == []


@pytest.mark.parametrize("name", CACHES)
def test_todays_version2_encoder_writes_the_fixtures_streams(name):
    cache = Cache.open(FIXTURES / name)
    with cache.open_shard(0) as reader:
        for b in range(reader.num_batches):
            stored = reader.read_record_batch(b)
            again = encode_batch(reader.read_batch(b), cache.layout)
            for column in stored.schema.names:
                assert stored.column(column).equals(again.column(column)), column


@pytest.mark.parametrize("name", CACHES)
def test_the_same_rows_in_version3_decode_identically(tmp_path, name):
    old = Cache.open(FIXTURES / name)
    layout = dataclasses.replace(old.layout, format_version=3)
    with CacheWriter(tmp_path / "v3", layout) as writer:
        for batch in old.iter_batches():
            writer.write(batch)
        m = old.manifest
        writer.finish(targets=m.targets, teacher=m.teacher, tokenizer=m.tokenizer, data=m.data)
    new = Cache.open(tmp_path / "v3")
    raw = json.loads((tmp_path / "v3" / "manifest.json").read_text())
    assert raw["format_version"] == 3 and new.layout == layout
    _assert_decodes_to(new, _expected(name))
    assert verify_cache(tmp_path / "v3", deep=True) == []


def test_a_shard_of_another_version_than_its_manifest_is_refused(tmp_path):
    shutil.copytree(FIXTURES / "cache_v2_topk", tmp_path / "c")
    manifest = tmp_path / "c" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["format_version"] = 3  # the shard's metadata still says 2
    manifest.write_text(json.dumps(raw))
    cache = Cache.open(tmp_path / "c")
    with pytest.raises(CacheFormatError, match="part-r000-00000.arrow: shard format version 2, the manifest says 3"):
        cache.open_shard(0)
    faults = verify_cache(tmp_path / "c")
    assert any("shard format version 2, the manifest says 3" in f.problem for f in faults)


def test_layout_and_manifest_versions_are_checked():
    with pytest.raises(ValueError, match="format_version 4 is not one of"):
        S.Layout(vocab_size=10, format_version=4)
    layout = S.Layout(vocab_size=10, format_version=2)
    assert layout.schema().metadata[S.META_VERSION] == b"2"
    assert S.Layout.from_dict(layout.to_dict(), 2) == layout and "format_version" not in layout.to_dict()
    cache = Cache.open(FIXTURES / "cache_v2_topk")
    with pytest.raises(ValueError, match="format_version 3 differs from the layout's 2"):
        dataclasses.replace(cache.manifest, format_version=3)
    assert pa.ipc.open_stream(pa.memory_map(str(cache.shard_path(0)))).schema.metadata[S.META_VERSION] == b"2"
