"""Caches at a URL, against a real S3 endpoint on 127.0.0.1 (moto's standalone server, as s3fs's own tests run
it): a build to s3:// equals a local build byte for byte, verify / inspect / export / train / eval read it
(training with prefetch, and with a local shard cache, ends with the local run's weights), a build killed mid-pass resumes
on S3 to the same cache, a damaged object is refused naming it, a cache without a manifest is refused as
incomplete, and the lock object keeps a second build out. Nothing of fsspec or s3fs is mocked: credentials and
the endpoint reach s3fs as a user's would, through AWS_* variables (format/storage.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (pip install -e '.[dev]') is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")

from click.testing import CliRunner  # noqa: E402

from teachercache.cli import main  # noqa: E402
from teachercache.errors import CacheCorruptError, CacheError, CacheIncompleteError, StorageError  # noqa: E402
from teachercache.format.cache import Cache  # noqa: E402
from teachercache.format.manifest import TargetSpec  # noqa: E402
from teachercache.format.mirror import stream_batch_rows  # noqa: E402
from teachercache.format.shards import ShardReader, file_sha256  # noqa: E402
from teachercache.format.storage import open_storage  # noqa: E402
from teachercache.inspect.report import inspect_cache  # noqa: E402
from teachercache.inspect.verify import verify_cache  # noqa: E402
from teachercache.interop.export import ExportOptions, export_cache  # noqa: E402
from teachercache.student.dataset import CacheDataset  # noqa: E402
from teachercache.student.evaluate import evaluate_model, load_model  # noqa: E402
from teachercache.student.options import LoaderOptions, ScheduleOptions, TrainOptions  # noqa: E402
from teachercache.student.train import train  # noqa: E402
from teachercache.teacher import remote_build  # noqa: E402
from teachercache.teacher.build import BuildError, BuildOptions, build_cache  # noqa: E402
from teachercache.teacher.corpus import DataOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "data" / "teacher"
VALID = ROOT / "data" / "corpus" / "valid.parquet"
BUCKET = "tc-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port with one bucket; AWS_* variables point every process (this one
    and its subprocesses) at it with dummy credentials. Yields the open s3fs filesystem."""
    import fsspec
    import s3fs

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint,
           remote_build.STAGING_ENV: str(tmp_path_factory.mktemp("staging"))}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # fsspec read FSSPEC_* at its import
    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()
        fsspec.config.conf["s3"].pop("endpoint_url", None)
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _build_options(out, **kw) -> BuildOptions:
    return BuildOptions(teacher=str(TEACHER), out=str(out), batch_size=4, shard_bytes=12_000, progress=False,
                        targets=TargetSpec(kind="topk", k=16),
                        data=DataOptions(paths=(str(VALID),), seq_len=64, max_docs=2), **kw)


@pytest.fixture(scope="module")
def built(s3, tmp_path_factory):
    """The same build twice: into a local directory and into s3://BUCKET/cache."""
    local = tmp_path_factory.mktemp("local") / "cache"
    build_cache(_build_options(local))
    url = f"s3://{BUCKET}/cache"
    result = build_cache(_build_options(url))
    assert result.manifest_path == f"{url}/manifest.json"
    return local, url


def _shard_table(cache: Cache) -> list[tuple]:
    return [(s.file, s.sha256, s.bytes, s.rows, s.target_entries) for s in cache.shards]


def _decoded(cache: Cache) -> list:
    return [(b.input_ids.tolist(), b.target_ids.tolist(), b.target_logprobs.tolist()) for b in cache.iter_batches()]


def test_build_to_s3_equals_the_local_build_byte_for_byte(built, s3):
    local, url = built
    a, b = Cache.open(local), Cache.open(url)
    assert len(a.shards) >= 3 and _shard_table(a) == _shard_table(b)
    assert a.manifest.totals == b.manifest.totals and a.manifest.data == b.manifest.data
    bucket = url.removeprefix("s3://")
    for name in sorted(p.name for p in (local / "tokenizer").iterdir()):
        assert s3.cat_file(f"{bucket}/tokenizer/{name}") == (local / "tokenizer" / name).read_bytes()
    for s in a.shards:  # the objects themselves, byte for byte
        assert s3.cat_file(f"{bucket}/{s.file}") == (local / s.file).read_bytes()
    listed = sorted(n.rsplit("/", 1)[1] for n in s3.ls(bucket))
    assert listed == sorted(p.name for p in local.iterdir() if p.name != "config.yaml")
    assert s3.ls(f"{bucket}/state") == [f"{bucket}/state/rank-000.json"]  # the lock object is gone
    assert _decoded(a) == _decoded(b)


def test_verify_inspect_and_export_read_the_cache_from_s3(built, tmp_path):
    local, url = built
    assert verify_cache(url, deep=True) == []
    remote_report, local_report = inspect_cache(url), inspect_cache(local)
    assert remote_report.pop("path") == url
    local_report.pop("path")
    remote_report["format"].pop("created"), local_report["format"].pop("created")  # two builds
    assert remote_report == local_report
    result = CliRunner().invoke(main, ["verify", url])
    assert (result.exit_code, result.output) == (0, f"{url}: OK\n")
    export_cache(url, tmp_path / "s3.parquet")
    export_cache(local, tmp_path / "local.parquet")
    assert pq.read_table(tmp_path / "s3.parquet").equals(pq.read_table(tmp_path / "local.parquet"))


def test_record_batch_rows_from_message_headers_equal_pyarrows_reader(built):
    """stream_batch_rows reads only the headers (ranged reads); pyarrow's own reader is the reference."""
    local, url = built
    cache, storage = Cache.open(local), open_storage(url)
    for info in cache.shards:
        with ShardReader(local / info.file, cache.layout) as reader:
            want = [reader.read_record_batch(i).num_rows for i in range(reader.num_batches)]
        got = stream_batch_rows(lambda a, b, f=info.file: storage.read_range(f, a, b), info.bytes, url)
        assert got.tolist() == want and sum(want) == info.rows
    with pytest.raises(CacheCorruptError, match="end-of-stream marker|ends inside"):
        data = (local / cache.shards[0].file).read_bytes()[:-8]
        stream_batch_rows(lambda a, b: data[a:b], len(data), "cut")


def _train_options(cache, out, **loader) -> TrainOptions:
    return TrainOptions(cache=str(cache), student="llama-tiny", out=str(out), progress=False, log_every=1, seed=3,
                        schedule=ScheduleOptions(steps=6, batch_size=4, lr=3e-3, warmup_steps=2),
                        loader=LoaderOptions(shuffle_buffer=16, **loader))


def test_training_from_s3_with_prefetch_and_a_shard_cache_equals_training_from_disk(built, tmp_path):
    from safetensors.numpy import load_file

    local, url = built
    train(_train_options(local, tmp_path / "local"))
    train(_train_options(url, tmp_path / "prefetch", prefetch_shards=2))
    train(_train_options(url, tmp_path / "cached", prefetch_shards=1, cache_dir=str(tmp_path / "shards"),
                         cache_dir_gb=1.0))
    want = load_file(tmp_path / "local" / "model.safetensors")
    for run in ("prefetch", "cached"):
        got = load_file(tmp_path / run / "model.safetensors")
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), run
    kept = list((tmp_path / "shards" / "shards").iterdir())  # the shards 6 steps read, all within 1 GiB
    assert kept and {p.name for p in kept} <= {f"{s.sha256}.arrow" for s in Cache.open(local).shards}
    assert all(file_sha256(p) == p.stem for p in kept)
    summary = json.loads((tmp_path / "cached" / "training_summary.json").read_text())
    assert summary["cache"] == url
    model, tokenizer, _ = load_model(str(tmp_path / "local"), "cpu")  # eval --data URL: the same figures
    assert evaluate_model(model, url, tokenizer, max_rows=8) == evaluate_model(model, str(local), tokenizer,
                                                                               max_rows=8)


def test_a_small_shard_cache_keeps_the_least_recently_used_within_its_budget(built, tmp_path):
    local, url = built
    sizes = [s.bytes for s in Cache.open(local).shards]
    budget = max(sizes) + min(sizes)          # room for about two shards
    rows = list(CacheDataset(url, shuffle=False, prefetch_shards=1, cache_dir=tmp_path, cache_dir_bytes=budget))
    want = list(CacheDataset(local, shuffle=False))
    assert [r["row_index"] for r in rows] == [r["row_index"] for r in want]
    assert all(np.array_equal(a["target_ids"], b["target_ids"]) for a, b in zip(rows, want))
    kept = list((tmp_path / "shards").glob("*.arrow"))
    assert 1 <= len(kept) < len(sizes) and sum(p.stat().st_size for p in kept) <= budget
    assert not list((tmp_path / "shards").glob("*.partial-*"))


KILLED_BUILD = """
import sys
from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions
build_cache(BuildOptions(teacher=sys.argv[1], out=sys.argv[2], batch_size=4, shard_bytes=12_000, progress=False,
                         targets=TargetSpec(kind="topk", k=16),
                         data=DataOptions(paths=(sys.argv[3],), seq_len=64, max_docs=2)))
"""


def test_a_build_killed_mid_pass_resumes_on_s3_to_the_same_cache(built, s3):
    local, _ = built
    url = f"s3://{BUCKET}/killed"
    args = [sys.executable, "-c", KILLED_BUILD, str(TEACHER), url, str(VALID)]
    proc = subprocess.Popen(args)
    state, deadline, closed = f"{BUCKET}/killed/state/rank-000.json", time.time() + 180, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            closed = len(json.loads(s3.cat_file(state))["shards"])
        except FileNotFoundError:
            closed = 0
        if closed >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert closed >= 2 and not s3.exists(f"{BUCKET}/killed/manifest.json")
    with pytest.raises(CacheIncompleteError, match="incomplete"):
        Cache.open(url)
    build_cache(_build_options(url, resume=True))  # the same options as KILLED_BUILD's
    assert _shard_table(Cache.open(url)) == _shard_table(Cache.open(local))
    assert verify_cache(url) == []


def _copy_prefix(s3, source: str, target: str) -> None:
    for path in s3.find(source):
        s3.pipe_file(target + path[len(source):], s3.cat_file(path))


def test_a_damaged_object_is_refused_by_the_streaming_checksum_naming_it(built, s3):
    _, url = built
    bucket = url.removeprefix("s3://")
    _copy_prefix(s3, bucket, f"{BUCKET}/damaged")
    shard = Cache.open(url).shards[1].file
    data = bytearray(s3.cat_file(f"{BUCKET}/damaged/{shard}"))
    data[len(data) // 2] ^= 0x40
    s3.pipe_file(f"{BUCKET}/damaged/{shard}", bytes(data))
    damaged = f"s3://{BUCKET}/damaged"
    with pytest.raises(CacheCorruptError, match=f"{damaged}/{shard}: SHA-256 differs .* while downloading"):
        list(Cache.open(damaged).iter_batches())
    assert [(f.file, "SHA-256" in f.problem) for f in verify_cache(damaged)] == [(f"{damaged}/{shard}", True)]
    s3.pipe_file(f"{BUCKET}/damaged/{shard}", bytes(data[:-100]))
    with pytest.raises(CacheCorruptError, match=f"{damaged}/{shard}: size {len(data) - 100} bytes, the manifest"):
        Cache.open(damaged).check_shard(1)


def test_a_cache_without_a_manifest_is_refused_as_incomplete(built, s3):
    _, url = built
    bucket = url.removeprefix("s3://")
    _copy_prefix(s3, bucket, f"{BUCKET}/partial")
    s3.rm(f"{BUCKET}/partial/manifest.json")
    for read in (Cache.open, verify_cache, lambda u: CacheDataset(u)):
        with pytest.raises(CacheIncompleteError, match=rf"s3://{BUCKET}/partial/manifest.json: missing: the cache "
                                                       "is incomplete"):
            result = read(f"s3://{BUCKET}/partial")
            if isinstance(result, list):  # verify reports instead of raising
                raise CacheIncompleteError(result[0].file, result[0].problem)
    with pytest.raises(CacheIncompleteError, match="nothing is stored there"):
        Cache.open(f"s3://{BUCKET}/nothing-here")


def test_a_second_build_is_kept_out_by_the_lock_object_and_foreign_objects_are_left_alone(s3):
    out = f"s3://{BUCKET}/locked"
    s3.pipe_file(f"{BUCKET}/locked/state/rank-000.lock",
                 json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "time": time.time()}).encode())
    with pytest.raises(BuildError, match=rf"{out}: another build is writing into this cache \(rank 0 is locked by "
                                         "elsewhere"):
        build_cache(_build_options(out))
    assert s3.ls(f"{BUCKET}/locked/state") == [f"{BUCKET}/locked/state/rank-000.lock"]  # nothing written
    # this machine, a live process, another staging directory (another TEACHERCACHE_STAGING): refused too
    s3.pipe_file(f"{BUCKET}/locked/state/rank-000.lock", json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "token": "y", "time": 0, "staging": "/elsewhere"}).encode())
    with pytest.raises(BuildError, match=rf"rank 0 is locked by {socket.gethostname()} process {os.getpid()}"):
        build_cache(_build_options(out))
    s3.pipe_file(f"{BUCKET}/foreign/notes.txt", b"mine")
    with pytest.raises(BuildError, match=rf"s3://{BUCKET}/foreign: not a teachercache cache but objects .*notes.txt"):
        build_cache(_build_options(f"s3://{BUCKET}/foreign"))
    assert s3.ls(f"{BUCKET}/foreign") == [f"{BUCKET}/foreign/notes.txt"]


def test_a_protocol_without_its_package_or_unknown_to_fsspec_is_refused_with_the_fix():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(StorageError, match=r"gs://b/c: reading or writing gs:// needs a package .*"
                                               r"pip install 'teachercache\[gcs\]'"):
            Cache.open("gs://b/c")
    with pytest.raises(StorageError, match="nosuch://b/c: fsspec does not know the protocol nosuch://"):
        Cache.open("nosuch://b/c")
    result = CliRunner().invoke(main, ["inspect", "nosuch://b/c"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "nosuch://b/c" in result.output


def test_two_nodes_build_into_s3_and_train_from_it_as_from_disk(built, s3, tmp_path):
    """`torchrun --nnodes 2` (tests/multinode.py: two launches joined by the c10d rendezvous on 127.0.0.1): a
    build into s3:// holds the one-process build's rows value for value (each node stages its shards and state
    on its own disk and publishes them; rank 0 writes the manifest last), and training from the cache at the URL
    (the single-process build's, uploaded: the same files as the local one) ends with the weights of the same
    two-node training from the local directory."""
    from multinode import torchrun_two_nodes
    from safetensors.numpy import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import cache_rows, global_row_indices

    local, same = built
    url = f"s3://{BUCKET}/two-nodes"
    flags = ["--teacher", TEACHER, "--data", VALID, "--seq-len", "64", "--max-docs", "2", "--batch-size", "4",
             "--k", "16", "--shard-mb", str(12_000 / (1 << 20)), "--no-progress"]
    torchrun_two_nodes(["build", "--out", url, *flags], tmp_path / "logs-build")
    m = Cache.open(url).manifest
    assert m.extra["world_size"] == 2 and {s.file.split("-")[1] for s in m.shards} == {"r000", "r001"}
    assert verify_cache(url, deep=True) == []
    whole, rows = cache_rows(local), cache_rows(url)
    assert sorted(global_row_indices(url)) == list(range(len(whole)))
    for g, row in zip(global_row_indices(url), rows, strict=True):
        for name in whole[g]:
            np.testing.assert_array_equal(row[name], whole[g][name], err_msg=f"row {g}: {name}")

    def args(cache, out):
        return ["train", "--cache", cache, "--student", "llama-tiny", "--steps", "3", "--batch-size", "2", "--lr",
                "3e-3", "--warmup-steps", "1", "--log-every", "1", "--no-shuffle", "--no-progress", "--out", out]

    torchrun_two_nodes(args(same, tmp_path / "from-s3"), tmp_path / "logs-s3")
    torchrun_two_nodes(args(local, tmp_path / "from-disk"), tmp_path / "logs-disk")
    got, want = (load_file(tmp_path / run / "model.safetensors") for run in ("from-s3", "from-disk"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_slices_built_into_s3_merge_there_into_the_one_job_build(built, s3, tmp_path):
    """`build --slice i/3 --out s3://...` three times, then `merge` in the bucket by reference (the default) and
    with --copy (into the bucket, and from it into a local directory): each is the one-job build's rows, value
    for value. A reference out of the bucket is refused, and a referenced part that is gone is named."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import cache_rows, global_row_indices

    local, _ = built
    parts = [f"s3://{BUCKET}/slices/c-{i}" for i in range(3)]
    for i, part in enumerate(parts):
        build_cache(_build_options(part, slice=f"{i}/3"))
    refused = CliRunner().invoke(main, ["merge", *parts, "--out", str(tmp_path / "not-in-the-bucket")])
    assert refused.exit_code == 1 and "not in the bucket of --out" in refused.output and "--copy" in refused.output
    whole = cache_rows(local)
    merged = {f"s3://{BUCKET}/merged-ref": [], f"s3://{BUCKET}/merged": ["--copy"], str(tmp_path / "merged"): ["--copy"]}
    for out, flags in merged.items():
        result = CliRunner().invoke(main, ["merge", parts[2], parts[0], parts[1], "--out", out, *flags])
        assert result.exit_code == 0, result.output
        assert verify_cache(out, deep=True) == []
        got = [g for part in parts for g in global_row_indices(part)]  # slice 0's rows, then 1's, then 2's
        rows = cache_rows(out)
        assert sorted(got) == list(range(len(whole))) and len(rows) == len(whole)
        for g, row in zip(got, rows):
            for name in whole[g]:
                np.testing.assert_array_equal(row[name], whole[g][name], err_msg=f"{out}, row {g}: {name}")
    files = [sh.file for sh in Cache.open(f"s3://{BUCKET}/merged-ref").shards]
    assert files[0].startswith("../slices/c-0/shards/") and all(f.startswith("../slices/c-") for f in files)
    assert not s3.exists(f"{BUCKET}/merged-ref/shards")  # the references' objects are the parts' own
    again = CliRunner().invoke(main, ["merge", *parts, "--out", f"s3://{BUCKET}/merged", "--copy"])
    assert again.exit_code == 1 and "not empty" in again.output
    s3.rm(f"{BUCKET}/slices/c-1/manifest.json")
    with pytest.raises(CacheError, match=r"shard path \.\./slices/c-1/shards/\.\.\.: s3://.*/slices/c-1 is not a "
                                         "complete cache"):
        Cache.open(f"s3://{BUCKET}/merged-ref")
    s3.invalidate_cache()
