"""`verify` checks the cache's tokenizer/ (its files, then the tokenizer they load against the manifest's
fingerprint) and reads no file through a symbolic link: each such fault names the path, exit code 1."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import random_batch, write_cache

from teachercache.cli import main
from teachercache.errors import CacheCorruptError, CacheFormatError, CacheLimitError, CachePathError
from teachercache.format import cache as C
from teachercache.format import schema as S
from teachercache.format.cache import Cache, check_tokenizer_files
from teachercache.format.manifest import MANIFEST_NAME, tokenizer_fingerprint
from teachercache.inspect.verify import verify_cache


@pytest.fixture
def cache(demo_cache, tmp_path):
    """A copy of the real demo cache (its tokenizer/ as the build wrote it)."""
    return shutil.copytree(demo_cache, tmp_path / "c")


def _faults(cache, deep=False):
    """verify's faults; the CLI prints each one and exits 1."""
    faults = verify_cache(cache, deep=deep)
    result = CliRunner().invoke(main, ["verify", str(cache), *(["--deep"] if deep else [])])
    assert result.exit_code == (1 if faults else 0) and "Traceback" not in result.output, result.output
    for fault in faults:
        assert f"FAULT {fault}" in result.output
    return faults


def _one(faults, path, problem):
    assert [(f.file, problem in f.problem) for f in faults] == [(str(path), True)], faults
    return faults[0].problem


def test_a_built_cache_and_its_tokenizer_pass(cache):
    assert _faults(cache, deep=True) == []
    tokenizer = Cache.open(cache).tokenizer()
    assert tokenizer_fingerprint(tokenizer) == Cache.open(cache).manifest.tokenizer.fingerprint


def test_a_replaced_tokenizer_fails_verify_deep_and_is_refused_by_the_reader(cache):
    """Two tokens' ids swapped: the same length, so `show` printed the wrong text without a word."""
    path = cache / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    path.write_text(json.dumps(tok))
    problem = _one(_faults(cache, deep=True), cache / "tokenizer", "differs from the manifest's tokenizer.fingerprint")
    assert "files were replaced or damaged" in problem
    with pytest.raises(CacheCorruptError, match="tokenizer.fingerprint"):
        Cache.open(cache).tokenizer()


def test_a_tokenizer_of_another_size_is_refused(cache):
    path = cache / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["model"]["vocab"]["zzzzzz"] = len(tok["model"]["vocab"])
    path.write_text(json.dumps(tok))
    _one(_faults(cache), cache / "tokenizer", "the tokenizer holds 8193 tokens, the manifest's tokenizer.vocab_size "
                                              "is 8192")


def test_tokenizer_files_that_do_not_load_are_a_fault(cache):
    path = cache / "tokenizer" / "tokenizer.json"
    text = path.read_text()
    path.write_text(text[:-100])
    _one(_faults(cache), path, "not valid JSON")
    path.write_text(json.dumps({"model": {}, "padding_to_keep_the_size": text}))
    _one(_faults(cache), cache / "tokenizer", "transformers cannot load the tokenizer")
    path.write_text("{}")  # 8192 tokens cannot fit in 300 bytes: the manifest's vocab_size is refused
    _one(_faults(cache), cache / MANIFEST_NAME, "field layout.vocab_size: 8192 is beyond the limit of")


def test_symlinks_in_the_tokenizer_directory_are_refused_naming_them(cache, tmp_path):
    file = cache / "tokenizer" / "tokenizer.json"
    shutil.move(file, tmp_path / "elsewhere.json")
    file.symlink_to(tmp_path / "elsewhere.json")  # the same bytes, read through a link
    _one(_faults(cache), file, "is a symbolic link")
    file.unlink()
    shutil.move(tmp_path / "elsewhere.json", cache / "kept.json")
    file.symlink_to(cache / "kept.json")  # even one that stays inside the cache
    _one(_faults(cache), file, "is a symbolic link")
    shutil.move(cache / "tokenizer", tmp_path / "tok")
    (cache / "tokenizer").symlink_to(tmp_path / "tok")
    _one(_faults(cache), cache / "tokenizer", "is a symbolic link")
    with pytest.raises(CachePathError, match="tokenizer: is a symbolic link"):
        Cache.open(cache).tokenizer()


def test_what_is_not_a_regular_file_in_the_tokenizer_directory_is_refused_without_blocking(cache):
    os.mkfifo(cache / "tokenizer" / "special_tokens_map.json")
    _one(_faults(cache), cache / "tokenizer" / "special_tokens_map.json", "is not a regular file (a named pipe)")


def test_tokenizer_json_limits(cache):
    config = cache / "tokenizer" / "tokenizer_config.json"
    original = config.read_text()
    config.write_text('{"x": ' + "[" * 5000 + "]" * 5000 + "}")  # transformers would raise a RecursionError
    _one(_faults(cache), config, "JSON nested deeper than the limit of 64 levels")
    config.write_text(original)
    with open(cache / "tokenizer" / "big.bin", "wb") as f:  # sparse: no disk used
        f.truncate(C.MAX_TOKENIZER_BYTES)
    _one(_faults(cache), cache / "tokenizer", f"beyond the limit of {C.MAX_TOKENIZER_BYTES}")
    (cache / "tokenizer" / "big.bin").unlink()
    for i in range(C.MAX_TOKENIZER_FILES):
        (cache / "tokenizer" / f"x{i}.txt").write_text("x")
    with pytest.raises(CacheLimitError, match=f"entries is beyond the limit of {C.MAX_TOKENIZER_FILES}"):
        check_tokenizer_files(cache)


def test_symlinked_manifest_and_shards_are_faults_and_not_read(cache, tmp_path):
    shard = cache / Cache.open(cache).shards[0].file
    shutil.move(shard, cache / "moved.arrow")
    shard.symlink_to(cache / "moved.arrow")  # inside the cache: the reader follows it, verify refuses it
    assert len(list(Cache.open(cache).iter_batches())) >= 1
    _one(_faults(cache), shard, "is a symbolic link (to ")
    shard.unlink()
    shutil.move(cache / "moved.arrow", shard)
    shutil.move(cache / "shards", cache / "real-shards")
    (cache / "shards").symlink_to(cache / "real-shards")
    _one(_faults(cache), cache / "shards", "is a symbolic link")  # once, not once per shard
    manifest = cache / MANIFEST_NAME
    shutil.move(manifest, tmp_path / "m.json")
    manifest.symlink_to(tmp_path / "m.json")
    _one(_faults(cache), manifest, "is a symbolic link")


def test_a_cache_without_a_tokenizer_directory_passes(tmp_path):
    """Caches written without one (test and benchmark writers) have nothing to check; `show` and `train`
    refuse them when they need the tokenizer."""
    layout = S.Layout(vocab_size=300)
    write_cache(tmp_path / "c", [random_batch(np.random.default_rng(0), layout, [8])], layout)
    assert _faults(tmp_path / "c") == []
    with pytest.raises(CacheFormatError, match="the cache has no tokenizer directory"):
        Cache.open(tmp_path / "c").tokenizer()
