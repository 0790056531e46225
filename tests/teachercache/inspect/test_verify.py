"""`teachercache verify`: a sound cache passes; each kind of damage is reported naming the file, and the
command exits non-zero."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import random_batch, write_cache

from teachercache.cli import main
from teachercache.errors import CacheCorruptError
from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.manifest import MANIFEST_NAME
from teachercache.inspect.verify import verify_cache

LAYOUT = S.Layout(vocab_size=700)


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, LAYOUT, [16, 16, 9]) for _ in range(4)]
    write_cache(tmp_path / "c", batches, LAYOUT, shard_bytes=6000)
    return tmp_path / "c"


def _shard(cache, i=0):
    return cache / Cache.open(cache).shards[i].file


def _verify_cli(cache):
    return CliRunner().invoke(main, ["verify", str(cache)])


def test_sound_cache_passes(cache):
    assert len(Cache.open(cache).shards) >= 2
    assert verify_cache(cache) == []
    result = _verify_cli(cache)
    assert result.exit_code == 0 and "OK" in result.output


def _truncate(cache):
    p = _shard(cache)
    p.write_bytes(p.read_bytes()[:-100])
    return p


def _flip(cache):
    p = _shard(cache)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return p


def _remove(cache):
    p = _shard(cache, 1)
    p.unlink()
    return p


def _newer_version(cache):
    raw = json.loads((cache / MANIFEST_NAME).read_text())
    raw["format_version"] = S.FORMAT_VERSION + 1
    (cache / MANIFEST_NAME).write_text(json.dumps(raw))
    return cache / MANIFEST_NAME


def _escape(cache):
    raw = json.loads((cache / MANIFEST_NAME).read_text())
    raw["shards"][0]["file"] = "../outside.arrow"
    (cache / MANIFEST_NAME).write_text(json.dumps(raw))
    return cache / MANIFEST_NAME


def _stray(cache):
    p = cache / "shards" / "part-r000-99999.arrow"
    shutil.copy(_shard(cache), p)
    return p


@pytest.mark.parametrize("damage, problem", [
    (_truncate, "size"), (_flip, "SHA-256"), (_remove, "missing"), (_newer_version, f"format_version: {S.FORMAT_VERSION + 1}"),
    (_escape, "not a plain relative path"), (_stray, "not listed in the manifest"),
])
def test_damage_is_reported_with_the_file_and_a_nonzero_exit(cache, damage, problem):
    damaged = damage(cache)
    faults = verify_cache(cache)
    assert any(str(damaged) == f.file and problem in f.problem for f in faults), faults
    result = _verify_cli(cache)
    assert result.exit_code != 0
    assert str(damaged) in result.output and problem in result.output


def test_reader_refuses_a_damaged_shard_before_decoding(cache):
    _flip(cache)
    with pytest.raises(CacheCorruptError, match="SHA-256"):
        list(Cache.open(cache).iter_batches())


def test_counts_that_disagree_with_the_manifest_are_faults(cache):
    raw = json.loads((cache / MANIFEST_NAME).read_text())
    raw["shards"][0]["rows"] += 1
    raw["totals"]["rows"] += 1
    (cache / MANIFEST_NAME).write_text(json.dumps(raw))
    faults = verify_cache(cache)
    assert len(faults) == 1 and "rows, the manifest says" in faults[0].problem
