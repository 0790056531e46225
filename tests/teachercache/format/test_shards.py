"""Shard files: atomic writes (a writer killed mid-shard leaves nothing a reader accepts), reading chosen
columns only, and damaged files refused with the project's own error."""

from __future__ import annotations

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
from helpers import random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teachercache.errors import CacheCorruptError, CacheFormatError, CacheVersionError
from teachercache.format import schema as S
from teachercache.format.shards import ShardReader, ShardWriter, file_sha256

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


def test_a_shard_is_an_arrow_stream_and_an_ipc_file_is_refused(tmp_path):
    batches, _ = _write(tmp_path / "s.arrow")
    data = (tmp_path / "s.arrow").read_bytes()
    assert data[:4] == b"\xff\xff\xff\xff" and data[-8:] == b"\xff\xff\xff\xff\x00\x00\x00\x00"
    table = ipc.open_stream(pa.memory_map(str(tmp_path / "s.arrow"))).read_all()
    with ShardReader(tmp_path / "s.arrow", LAYOUT) as stream:
        assert stream.num_batches == 3
        for i in (2, 0, 1):  # random access
            assert stream.read_record_batch(i).equals(table.to_batches()[i])
            np.testing.assert_array_equal(stream.read_batch(i).input_ids, batches[i].input_ids)
    with ipc.new_file(str(tmp_path / "f.arrow"), table.schema) as w:  # the same batches in an IPC *file*
        for record in table.to_batches():
            w.write_batch(record)
    with pytest.raises(CacheCorruptError, match="f.arrow.*end-of-stream marker"):
        ShardReader(tmp_path / "f.arrow", LAYOUT)


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
    from teachercache.format import schema as S
    from teachercache.format.shards import ShardWriter
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
    script = KILL_SCRIPT.format(tests=str(Path(__file__).resolve().parents[2]), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and ".partial-" in leftovers[0].name and leftovers[0].stat().st_size > 0
    with pytest.raises(CacheCorruptError, match="no end-of-stream marker"):
        ShardReader(leftovers[0], LAYOUT)


def test_truncated_and_flipped_shards_are_refused(tmp_path):
    _write(tmp_path / "s.arrow")
    data = (tmp_path / "s.arrow").read_bytes()
    (tmp_path / "t.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheCorruptError, match="t.arrow: the Arrow IPC stream has no end-of-stream marker"):
        ShardReader(tmp_path / "t.arrow", LAYOUT)
    with pytest.raises(CacheCorruptError, match="missing"):
        ShardReader(tmp_path / "nope.arrow", LAYOUT)


def test_schema_version_and_layout_are_checked(tmp_path):
    _write(tmp_path / "s.arrow")
    with pytest.raises(CacheFormatError, match="layout differs"):
        ShardReader(tmp_path / "s.arrow", S.Layout(vocab_size=501, hidden_layers=(1,), hidden_width=4))
    table = ipc.open_stream(pa.memory_map(str(tmp_path / "s.arrow"))).read_all()
    for version, hint in ((S.FORMAT_VERSION + 1, "release that reads it"), (1, "older teachercache.*rebuild")):
        meta = dict(table.schema.metadata)
        meta[S.META_VERSION] = str(version).encode()  # as another teachercache would write it
        with ipc.new_stream(str(tmp_path / f"v{version}.arrow"), table.schema.with_metadata(meta)) as w:
            w.write_table(table.replace_schema_metadata(meta))
        with pytest.raises(CacheVersionError, match=f"v{version}.arrow: shard format version {version}.*{hint}"):
            ShardReader(tmp_path / f"v{version}.arrow", LAYOUT)


@st.composite
def _batches(draw):
    V = draw(st.sampled_from([1, 2, 256, 257, 8192, 65537]))
    hidden = draw(st.sampled_from([(), (0,), (1, 5)]))
    layout = S.Layout(vocab_size=V, sampled=draw(st.booleans()), hidden_layers=hidden,
                      hidden_width=3 if hidden else 0, hidden_dtype=draw(st.sampled_from(S.HIDDEN_DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        lengths = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
        k = draw(st.one_of(st.none(), st.integers(1, 16)))
        b = random_batch(rng, layout, lengths, k=k, mask_prob=draw(st.sampled_from([0.0, 0.5, 1.0])))
        if b.num_entries:  # adversarial values at random entries: p = 1, p = 0, the last id
            n = b.num_entries
            b.target_logprobs[rng.integers(0, n, 3)] = draw(st.sampled_from([0.0, -np.inf, -1e-12, -9.21]))
            first = b.target_offsets[:-1][b.target_sizes > 0]
            b.target_ids[first] = np.where(np.isin(V - 1, b.target_ids), b.target_ids[first], V - 1)
        batches.append(b)
    return layout, batches


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_batches())
def test_write_read_round_trip_property(tmp_path_factory, case):
    layout, batches = case
    path = tmp_path_factory.mktemp("rt") / "s.arrow"
    with ShardWriter(path, layout) as writer:
        for b in batches:
            writer.write(b)
    q = layout.quantizer
    with ShardReader(path, layout) as reader:
        assert reader.num_batches == len(batches)
        for want, got in zip(batches, reader):
            np.testing.assert_array_equal(got.input_ids, want.input_ids)
            np.testing.assert_array_equal(got.target_mask, want.target_mask)
            np.testing.assert_array_equal(got.target_sizes, want.target_sizes)
            assert np.abs(got.rest_mass - want.rest_mass).max(initial=0) <= 1e-3
            assert np.abs(got.label_logprob - want.label_logprob).max(initial=0) <= 1e-3
            for p in range(want.num_positions):
                w = slice(want.target_offsets[p], want.target_offsets[p + 1])
                g = slice(got.target_offsets[p], got.target_offsets[p + 1])
                ow, og = np.argsort(want.target_ids[w]), np.argsort(got.target_ids[g])
                np.testing.assert_array_equal(want.target_ids[w][ow], got.target_ids[g][og])
                x = np.minimum(-want.target_logprobs[w][ow].astype(np.float64), q.max_nats)
                bound = np.array([q.max_error(v) for v in x]) + 1e-5
                assert (np.abs(-x - got.target_logprobs[g][og]) <= bound).all()
                if layout.sampled:
                    np.testing.assert_array_equal(want.target_counts[w][ow], got.target_counts[g][og])
            for layer in layout.hidden_layers:
                rtol = 2**-8 if layout.hidden_dtype == "bfloat16" else 2**-11
                np.testing.assert_allclose(got.hidden[layer], want.hidden[layer], rtol=rtol, atol=1e-6)
