"""Hostile manifests: deep nesting, huge files and shard lists, absurd declared sizes and a hidden layer listed
twice are refused when the manifest is read, with an error naming the file, the field, the value and the limit;
the CLI prints it as one line (exit code 1, no traceback); a million-entry shard list reads in seconds."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import random_batch, write_cache

from teachercache.cli import main
from teachercache.errors import CacheFormatError, CacheIncompleteError, CacheLimitError, CachePathError
from teachercache.format import manifest as M
from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.manifest import MANIFEST_NAME, read_json_file, read_manifest
from teachercache.inspect.verify import verify_cache

LAYOUT = S.Layout(vocab_size=300, hidden_layers=(2,), hidden_width=3)


@pytest.fixture
def cache(tmp_path):
    write_cache(tmp_path / "c", [random_batch(np.random.default_rng(0), LAYOUT, [8, 8])], LAYOUT)
    return tmp_path / "c"


def _edit(path, fn):
    raw = json.loads((path / MANIFEST_NAME).read_text())
    fn(raw)
    (path / MANIFEST_NAME).write_text(json.dumps(raw))


def _edit_text(path, fn):
    (path / MANIFEST_NAME).write_text(fn((path / MANIFEST_NAME).read_text()))


def _refused(path, error=CacheFormatError, match=""):
    """read_manifest's error, checked to name the manifest; the CLI prints it as one line, exit code 1."""
    with pytest.raises(error, match=match) as info:
        read_manifest(path)
    assert str(path / MANIFEST_NAME) in str(info.value)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------
# JSON nesting and size.

def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [70, 1200, 100_000])
def test_deeply_nested_extra_is_refused_without_a_recursion_error(cache, depth):
    _edit_text(cache, lambda t: t.replace('"extra": {}', f'"extra": {{"x": {_nest(depth)}}}', 1))
    _refused(cache, CacheLimitError, "nested deeper than the limit of 64 levels")
    faults = verify_cache(cache)
    assert len(faults) == 1 and "nested deeper" in faults[0].problem and faults[0].file == str(cache / MANIFEST_NAME)
    result = CliRunner().invoke(main, ["verify", str(cache)])
    assert result.exit_code == 1 and "Traceback" not in result.output and "nested deeper" in result.output


def test_deep_nesting_in_a_typed_field_is_a_type_error_naming_it(cache):
    _edit_text(cache, lambda t: t.replace('"sources": [', f'"sources": [{_nest(500)}, ', 1))
    _refused(cache, CacheFormatError, r"field data.sources\[0\]: expected str, got a list of 1 items")


def test_extra_within_the_depth_limit_still_reads(cache):
    _edit_text(cache, lambda t: t.replace('"extra": {}', f'"extra": {{"x": {_nest(62)}}}', 1))
    assert read_manifest(cache).extra["x"] == json.loads(_nest(62))  # 64 levels with the file's and extra's


def test_json_files_are_read_within_size_and_depth_limits(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"a": [1, 2, 3]}))
    assert read_json_file(path, 100) == {"a": [1, 2, 3]}
    with pytest.raises(CacheLimitError, match=r"f.json: 16 bytes is beyond the limit of 10 bytes"):
        read_json_file(path, 10)
    with pytest.raises(CacheLimitError, match="nested deeper than the limit of 1 levels"):
        read_json_file(path, 100, max_depth=1)
    path.write_text('{"a": 1' + "0" * 5000 + "}")  # an integer too long for Python's int() is not a crash
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        read_json_file(path, 10_000)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)  # opening it for reading must not wait for a writer
    with pytest.raises(CacheFormatError, match="is not a regular file"):
        read_json_file(fifo, 100)


def test_a_manifest_beyond_the_size_limit_is_refused_before_it_is_read(cache):
    with open(cache / MANIFEST_NAME, "r+b") as f:  # sparse: no disk used
        f.truncate(M.MAX_MANIFEST_BYTES + 1)
    _refused(cache, CacheLimitError, f"{M.MAX_MANIFEST_BYTES + 1} bytes is beyond the limit of {M.MAX_MANIFEST_BYTES}")


def test_a_manifest_that_is_a_named_pipe_does_not_hang(cache):
    (cache / MANIFEST_NAME).unlink()
    os.mkfifo(cache / MANIFEST_NAME)
    with pytest.raises(CacheIncompleteError):
        read_manifest(cache)


# ---------------------------------------------------------------------------------------------------------
# Declared sizes.

V = LAYOUT.vocab_size


def _reseal_vocab(raw, v):
    raw["layout"]["vocab_size"] = raw["tokenizer"]["vocab_size"] = raw["teacher"]["output_size"] = v


@pytest.mark.parametrize("edit, field, value, limit", [
    (lambda r: r["layout"].update(vocab_size=1 << 24), "tokenizer.vocab_size", V, "differs from layout.vocab_size"),
    (lambda r: r["teacher"].update(output_size=V - 1), "teacher.output_size", V - 1, f"[layout.vocab_size {V}, "),
    (lambda r: r["teacher"].update(output_size=1 << 40), "teacher.output_size", 1 << 40, str(M.MAX_OUTPUT_SIZE)),
    (lambda r: r["layout"].update(hidden_width=1 << 20), "layout.hidden_width", 1 << 20, str(M.MAX_HIDDEN_WIDTH)),
    (lambda r: r["layout"].update(hidden_layers=list(range(2000))), "layout.hidden_layers", "a list of 2000 items",
     str(M.MAX_HIDDEN_LAYERS)),
    (lambda r: r["layout"].update(hidden_layers=[5000]), "layout.hidden_layers", 5000, f"[0, {M.MAX_HIDDEN_LAYERS})"),
    (lambda r: r["layout"]["quantizer"].update(starts=[0.0] * 100), "layout.quantizer.starts", "a list of 100",
     str(M.MAX_QUANTIZER_PIECES)),
    (lambda r: r["targets"].update(k=70_000), "targets.k", 70_000, "65535 ids"),
    (lambda r: r["targets"].update(max_k=1 << 20), "targets.max_k", 1 << 20, "65535 ids"),
    (lambda r: r["targets"].update(samples=1 << 30), "targets.samples", 1 << 30, str(M.MAX_SAMPLES)),
    (lambda r: r["data"].update(seq_len=1 << 40), "data.seq_len", 1 << 40, str(M.MAX_SEQ_LEN)),
    (lambda r: r["data"].update(documents_read=1 << 64), "data.documents_read", 1 << 64, str(M.MAX_COUNT)),
    (lambda r: (r["shards"][0].update(rows=1 << 64), r["totals"].update(rows=1 << 64)), r"shards\[0\].rows",
     1 << 64, str(M.MAX_COUNT)),
    (lambda r: r["shards"][0].update(target_positions=10 ** 6), r"shards\[0\].target_positions", 10 ** 6,
     "16, the shard's tokens"),
    (lambda r: (r["shards"][0].update(target_entries=10 ** 9), r["totals"].update(target_entries=10 ** 9)),
     r"shards\[0\].target_entries", 10 ** 9, "target positions x 300 ids"),
])
def test_absurd_declared_sizes_are_refused_naming_field_value_and_limit(cache, edit, field, value, limit):
    _edit(cache, edit)
    message = _refused(cache, CacheLimitError, f"field {field}: ")
    assert str(value) in message and limit in message, message


def test_a_resealed_vocabulary_is_refused_against_the_tokenizer_files(cache):
    """vocab_size 2**24 in every field that records it: only the tokenizer files can tell, by their size."""
    (cache / "tokenizer").mkdir()
    (cache / "tokenizer" / "tokenizer.json").write_text("x" * 5000)
    _edit(cache, lambda r: _reseal_vocab(r, 1 << 24))
    message = _refused(cache, CacheLimitError, "field layout.vocab_size: 16777216 is beyond the limit of 5000")
    assert "tokenizer/ hold 5000 bytes" in message
    _edit(cache, lambda r: _reseal_vocab(r, V))
    assert read_manifest(cache).layout.vocab_size == V  # the same files bound an honest vocabulary


@pytest.mark.parametrize("edit, error, problem", [
    (lambda r: r["targets"].update(temperature=float("nan")), CacheFormatError, "targets.temperature: nan is not"),
    (lambda r: r["layout"]["quantizer"].update(max_nats=float("inf")), CacheFormatError, "field layout"),
    (lambda r: r["shards"][0].update(sha256="ab"), CacheFormatError, r"shards\[0\].sha256: 'ab' is not a SHA-256"),
    (lambda r: r["shards"][0].update(file="x" * 5000), CachePathError, "longer than the limit of 1024"),
    (lambda r: (r["shards"].append(dict(r["shards"][0])), r.update(totals={k: 2 * v for k, v in r["totals"].items()})),
     CacheFormatError, r"shards\[1\].file: 'shards/part-r000-00000.arrow' is listed twice"),
    (lambda r: r["shards"].insert(0, []), CacheFormatError, r"shards\[0\]: expected an object"),
    (lambda r: r["shards"][0].pop("sha256"), CacheFormatError, r"shards\[0\].sha256 is missing"),
    (lambda r: r["shards"][0].update(tokens=True), CacheFormatError, r"shards\[0\].tokens: expected int, got True"),
])
def test_malformed_shard_lists_and_values_are_refused_naming_the_field(cache, edit, error, problem):
    _edit(cache, edit)
    _refused(cache, error, problem)


def test_too_many_shard_entries_are_refused_before_any_is_read(cache):
    entries = ",".join(["{}"] * (M.MAX_SHARDS + 1))
    _edit_text(cache, lambda t: t[:t.index('"shards": [') + 11] + entries + ", " + t[t.index('"shards": [') + 11:])
    _refused(cache, CacheLimitError, f"field shards: a list of {M.MAX_SHARDS + 2} items is beyond the limit of "
             f"{M.MAX_SHARDS} entries")


def test_a_hidden_layer_listed_twice_is_refused_by_reader_and_verify(tmp_path):
    """What `build --hidden-layers 2,2` wrote before the CLI refused it: one column named twice."""
    layout = S.Layout(vocab_size=300, hidden_layers=(2, 2), hidden_width=3)
    write_cache(tmp_path / "c", [random_batch(np.random.default_rng(0), layout, [8, 8])], layout)
    message = _refused(tmp_path / "c", CacheFormatError, r"field layout.hidden_layers: layer 2 is listed twice in "
                       r"\[2, 2\]")
    assert "rebuild the cache with distinct --hidden-layers" in message
    faults = verify_cache(tmp_path / "c", deep=True)
    assert len(faults) == 1 and "listed twice" in faults[0].problem


# ---------------------------------------------------------------------------------------------------------
# Shard lists of a million entries, and symlinked directories.

def _many_shards(cache, n):
    raw = json.loads((cache / MANIFEST_NAME).read_text())
    first = raw["shards"][0]
    raw["shards"] = [dict(first, file=f"shards/part-r{i // 100000:03d}-{i % 100000:05d}.arrow") for i in range(n)]
    raw["totals"] = {k: first[k] * n for k in raw["totals"]}
    (cache / MANIFEST_NAME).write_text(json.dumps(raw, indent=2))


def test_reading_is_linear_in_the_shard_entries(cache):
    """200,000 entries (54 MB): the reader used to spend ~125 us an entry (25 s); now ~4 us (1M: 4 s)."""
    _many_shards(cache, 200_000)
    start = time.perf_counter()
    manifest = read_manifest(cache)
    seconds = time.perf_counter() - start
    assert len(manifest.shards) == 200_000 and manifest.shards[-1].file == "shards/part-r001-99999.arrow"
    assert seconds < 10, f"{seconds:.1f} s to read 200,000 shard entries"


def test_shard_paths_in_a_symlinked_directory_are_confined(cache, tmp_path):
    (tmp_path / "outside").mkdir()
    (cache / "more").symlink_to(tmp_path / "outside")
    _edit(cache, lambda r: r["shards"][0].update(file="more/x.arrow"))
    _refused(cache, CachePathError, "shard path 'more/x.arrow' resolves outside the cache directory")
    (cache / "more").unlink()
    (cache / "more").symlink_to(cache / "shards")  # a link that stays inside reads as before
    _edit(cache, lambda r: r["shards"][0].update(file="more/part-r000-00000.arrow"))
    assert len(list(Cache.open(cache).iter_batches())) == 1
    _edit(cache, lambda r: r["shards"][0].update(file="shards//./part-r000-00000.arrow"))  # another spelling
    assert read_manifest(cache).shards[0].file == "shards//./part-r000-00000.arrow"
