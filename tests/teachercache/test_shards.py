"""Shard files: atomic writes (a writer killed mid-shard leaves nothing a reader accepts), reading chosen
columns only, and damaged files refused with the project's own error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from teachercache import schema as S
from teachercache.errors import CacheCorruptError, CacheFormatError, CacheVersionError
from teachercache.shards import ShardReader, ShardWriter, file_sha256

from helpers import random_batch

LAYOUT = S.Layout(vocab_size=500, hidden_layers=(1,), hidden_width=4)


def _write(path: Path, n_batches=3, layout=LAYOUT):
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, layout, [12, 7]) for _ in range(n_batches)]
    with ShardWriter(path, layout) as writer:
        for b in batches:
            writer.write(b)
    return batches, writer.info


def test_writer_records_counts_and_checksum(tmp_path):
    batches, info = _write(tmp_path / "s.arrow")
    assert info.file == "s.arrow"
    assert info.rows == 6 and info.tokens == 57
    assert info.target_positions == sum(int(b.target_mask.sum()) for b in batches)
    assert info.target_entries == sum(b.num_entries for b in batches)
    assert info.bytes == (tmp_path / "s.arrow").stat().st_size
    assert info.sha256 == file_sha256(tmp_path / "s.arrow")
    assert [p.name for p in tmp_path.iterdir()] == ["s.arrow"]  # no temporary file left


def test_reader_reads_chosen_columns_only(tmp_path):
    batches, _ = _write(tmp_path / "s.arrow")
    with ShardReader(tmp_path / "s.arrow", LAYOUT, columns=[S.TARGET_SIZES, S.REST_MASS]) as reader:
        assert reader.num_batches == 3
        record = reader.read_record_batch(1)
        assert record.schema.names == [S.TARGET_SIZES, S.REST_MASS]
        out = reader.read_batch(1)
    assert out.input_ids is None and out.target_ids is None and out.hidden == {}
    np.testing.assert_array_equal(out.target_sizes, batches[1].target_sizes)
    with ShardReader(tmp_path / "s.arrow", LAYOUT) as reader:
        full = reader.read_batch(2)
    np.testing.assert_array_equal(full.input_ids, batches[2].input_ids)
    assert full.hidden[1].shape == batches[2].hidden[1].shape


def test_writer_error_leaves_no_file(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s.arrow", LAYOUT) as writer:
            writer.write(random_batch(rng, LAYOUT, [5]))
            raise RuntimeError("teacher crashed")
    assert list(tmp_path.iterdir()) == []


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {tests!r})
    from helpers import random_batch
    from teachercache import schema as S
    from teachercache.shards import ShardWriter
    layout = S.Layout(vocab_size=500, hidden_layers=(1,), hidden_width=4)
    rng = np.random.default_rng(0)
    with ShardWriter({path!r}, layout) as w:
        for i in range(10**6):
            w.write(random_batch(rng, layout, [64, 64]))
            if i == 3:
                print("WRITING", flush=True)
            time.sleep(0.01)
""")


def test_writer_killed_mid_shard_leaves_nothing_a_reader_accepts(tmp_path):
    path = tmp_path / "s.arrow"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parents[1]), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and ".partial-" in leftovers[0].name and leftovers[0].stat().st_size > 0
    with pytest.raises(CacheCorruptError, match="not a readable Arrow IPC file"):
        ShardReader(leftovers[0], LAYOUT)


def test_truncated_and_flipped_shards_are_refused(tmp_path):
    _write(tmp_path / "s.arrow")
    data = (tmp_path / "s.arrow").read_bytes()
    (tmp_path / "t.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheCorruptError, match="t.arrow: not a readable"):
        ShardReader(tmp_path / "t.arrow", LAYOUT)
    with pytest.raises(CacheCorruptError, match="missing"):
        ShardReader(tmp_path / "nope.arrow", LAYOUT)


def test_schema_version_and_layout_are_checked(tmp_path):
    _write(tmp_path / "s.arrow")
    with pytest.raises(CacheFormatError, match="layout differs"):
        ShardReader(tmp_path / "s.arrow", S.Layout(vocab_size=501, hidden_layers=(1,), hidden_width=4))
    table = ipc.open_file(pa.memory_map(str(tmp_path / "s.arrow"))).read_all()
    meta = dict(table.schema.metadata)
    meta[S.META_VERSION] = b"2"  # as a newer teachercache would write it
    with ipc.new_file(str(tmp_path / "v2.arrow"), table.schema.with_metadata(meta)) as w:
        w.write_table(table.replace_schema_metadata(meta))
    with pytest.raises(CacheVersionError, match="v2.arrow: shard format version 2"):
        ShardReader(tmp_path / "v2.arrow", LAYOUT)
