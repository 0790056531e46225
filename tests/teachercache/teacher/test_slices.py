"""`build --slice i/n` and `teachercache merge` (format.slices, format.merge) on CPU with a tiny real Llama:
the merge of three slice caches holds the one-job build's rows, value for value (row g of the one-job build
is row g div 3 of slice g mod 3), for top-k targets with a hidden layer and for sampled targets (whose draws
are seeded by the global row index); parts that do not make one build are refused naming the part; merged
caches, referencing or copying the shards, verify and train."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import cache_rows
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from teachercache.cli import main
from teachercache.errors import CacheCorruptError, CachePathError, OptionError
from teachercache.format.cache import Cache
from teachercache.format.manifest import MANIFEST_NAME, TargetSpec
from teachercache.format.merge import MergeError, MergeOptions, merge_caches
from teachercache.format.slices import RULE, Slice
from teachercache.inspect.verify import verify_cache
from teachercache.student.options import ScheduleOptions, TrainOptions
from teachercache.student.train import train
from teachercache.teacher.build import BuildError, BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"
N = 3
TOPK = dict(targets=TargetSpec(kind="topk", k=8), hidden_layers=(1,))
SAMPLED = dict(targets=TargetSpec(kind="sample", k=None, samples=16, seed=7))


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


def _build(teacher, out, slice=None, seq_len=48, max_docs=2, **kw):
    """71 rows of 48 tokens (2 documents), batches of 4, shards of about 4 batches."""
    kw = {**TOPK, **kw}
    build_cache(BuildOptions(teacher=str(teacher), out=str(out), slice=slice, batch_size=4, shard_bytes=12_000,
                             progress=False, data=DataOptions(paths=(str(CORPUS),), seq_len=seq_len,
                                                              max_docs=max_docs), **kw))
    return out


@pytest.fixture(scope="module")
def builds(teacher, tmp_path_factory):
    """{kind: (one-job cache, [slice caches 0..N-1])} for top-k (with hidden layer 1) and sampled targets."""
    root = tmp_path_factory.mktemp("builds")
    out = {}
    for name, kw in (("topk", TOPK), ("sample", SAMPLED)):
        one = _build(teacher, root / f"{name}-one", **kw)
        out[name] = one, [_build(teacher, root / f"{name}-{i}", slice=f"{i}/{N}", **kw) for i in range(N)]
    return out


def _assert_merge_is_the_one_job_build(merged, one):
    """Row g of the one-job build is row g div N of slice g mod N; slice s's rows come s-th in the merge."""
    whole, parts = cache_rows(one), cache_rows(merged)
    assert len(parts) == len(whole) > 20
    slice_rows = [len(range(s, len(whole), N)) for s in range(N)]
    starts = np.cumsum([0] + slice_rows)
    for g, want in enumerate(whole):
        got = parts[starts[g % N] + g // N]
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"row {g}: {name}")
    a, b = Cache.open(merged).manifest, Cache.open(one).manifest
    assert (a.layout, a.targets, a.teacher, a.tokenizer, a.data) == \
        (b.layout, b.targets, b.teacher, b.tokenizer, b.data)
    assert (a.totals.rows, a.totals.tokens, a.totals.target_positions, a.totals.target_entries) == \
        (b.totals.rows, b.totals.tokens, b.totals.target_positions, b.totals.target_entries)


@pytest.mark.parametrize("kind", ["topk", "sample"])
def test_a_merge_of_three_slices_holds_the_one_job_builds_rows(builds, tmp_path, kind):
    one, parts = builds[kind]
    for i, part in enumerate(parts):
        m = Cache.open(part).manifest
        assert m.extra["slice"] == {"index": i, "count": N, "rule": RULE}
        assert m.totals.rows == len(range(i, Cache.open(one).manifest.totals.rows, N)) and len(m.shards) > 1
    merged = merge_caches(list(reversed(parts)), tmp_path / "merged")  # any order of the parts
    assert [s.file.split("/shards/")[0] for s in merged.shards] == \
        [os.path.relpath(p, tmp_path / "merged") for p in parts for _ in Cache.open(p).manifest.shards]
    assert not (tmp_path / "merged" / "shards").exists()
    _assert_merge_is_the_one_job_build(tmp_path / "merged", one)
    copied = merge_caches(parts, tmp_path / "copied", MergeOptions(copy=True))
    assert all(s.file.startswith("shards/slice-") for s in copied.shards)
    _assert_merge_is_the_one_job_build(tmp_path / "copied", one)
    assert [s.sha256 for s in copied.shards] == [s.sha256 for s in merged.shards]


def test_merged_caches_verify_and_train_alike(builds, tmp_path):
    """Through the CLI: merge (references) and merge --copy, then verify --deep; then train from each: the same
    rows in the same order give the same weights."""
    one, parts = builds["topk"]
    rows = Cache.open(one).manifest.totals.rows
    runner = CliRunner()
    for name, flags in (("ref", []), ("copy", ["--copy"])):
        result = runner.invoke(main, ["merge", *map(str, parts), "--out", str(tmp_path / name), *flags])
        assert result.exit_code == 0, result.output
        assert f"{rows:,} rows" in result.output and "from 3 slices" in result.output
        result = runner.invoke(main, ["verify", str(tmp_path / name), "--deep"])
        assert result.exit_code == 0 and "OK" in result.output, result.output
        assert verify_cache(tmp_path / name, deep=True) == []
        train(TrainOptions(cache=str(tmp_path / name), student="llama-tiny", out=str(tmp_path / f"student-{name}"),
                           progress=False, log_every=1, schedule=ScheduleOptions(steps=3, batch_size=4, lr=3e-3,
                                                                                 warmup_steps=1)))
    a = load_file(tmp_path / "student-ref" / "model.safetensors")
    b = load_file(tmp_path / "student-copy" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    metrics = (tmp_path / "student-ref" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_parts_that_are_not_one_build_are_refused_naming_the_part(teacher, builds, tmp_path):
    one, parts = builds["topk"]
    refused = {
        "missing": (parts[:2], r"slice 2/3 missing: 2 of the 3 slices were given"),
        "the same path twice": ([parts[0], parts[1], parts[1]], f"{re.escape(str(parts[1]))}: given twice"),
        "not a slice": ([one, *parts[1:]], f"{re.escape(str(one))}: not a slice"),
    }
    dup = tmp_path / "dup-1"
    shutil.copytree(parts[1], dup)
    refused["a slice twice"] = ([parts[0], parts[1], dup], f"slice 1/3 is given twice: {re.escape(str(parts[1]))} "
                                                           f"and {re.escape(str(dup))}")
    other_n = _build(teacher, tmp_path / "of-four", slice="2/4")
    refused["another n"] = ([parts[0], parts[1], other_n], f"{re.escape(str(other_n))}: slice 2/4, but "
                                                           f"{re.escape(str(parts[0]))} is slice 0/3")
    for name, (change, field) in {"spec": (dict(targets=TargetSpec(kind="topk", k=4)), r"targets\.k is 4"),
                                  "seq-len": (dict(seq_len=32), r"data\.seq_len is 32"),
                                  "corpus": (dict(max_docs=3), r"data\.documents_read is 3"),
                                  "hidden layers": (dict(hidden_layers=()), r"layout\.hidden_\w+ is")}.items():
        foreign = _build(teacher, tmp_path / f"foreign-{name}", slice="2/3", **change)
        refused[name] = ([parts[0], parts[1], foreign], f"{re.escape(str(foreign))}: {field}.*, but "
                                                        f"{re.escape(str(parts[0]))} \\(slice 0\\) has")
    other = tmp_path / "other-teacher"  # another MLP width: its config fingerprint differs, its layout does not
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.save_pretrained(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
                     ).save_pretrained(other)
    foreign = _build(other, tmp_path / "foreign-teacher", slice="2/3")
    refused["teacher"] = ([parts[0], parts[1], foreign], f"{re.escape(str(foreign))}: teacher.name_or_path is .*"
                                                          "different builds; build every slice with the same --teacher")
    for name, (given, message) in refused.items():
        with pytest.raises(MergeError, match=message):
            merge_caches(given, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists(), name   # refused before anything is written
    result = CliRunner().invoke(main, ["merge", str(parts[0]), str(parts[1]), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 1 and "slice 2/3 missing" in result.output


def test_out_is_refused_when_it_is_taken_and_references_when_their_part_is_gone(builds, tmp_path):
    _, parts = builds["sample"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty; merge writes a new cache"):
        merge_caches(parts, tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]
    with pytest.raises(MergeError, match="lies inside the part"):
        merge_caches(parts, parts[0] / "merged")
    # the parts and the merged cache moved together still read; a part gone is named when the cache is opened
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in parts:
        shutil.copytree(p, moved / p.name)
    merge_caches([moved / p.name for p in parts], moved / "merged")
    shutil.move(moved, tmp_path / "elsewhere")
    assert verify_cache(tmp_path / "elsewhere" / "merged") == []
    shutil.rmtree(tmp_path / "elsewhere" / parts[1].name)
    with pytest.raises(CachePathError, match=f"{MANIFEST_NAME}: shard path ../{parts[1].name}/shards/...: the cache "
                                             "it references, .* does not exist"):
        Cache.open(tmp_path / "elsewhere" / "merged")
    with pytest.raises(MergeError, match="^s3://bucket/c-0: not in the bucket of --out .*: merge with --copy"):
        merge_caches(["s3://bucket/c-0", *parts[1:]], tmp_path / "from-a-bucket")  # (test_remote.py: with it)


def test_a_copy_checks_each_shard_and_an_interrupted_merge_is_redone(builds, tmp_path):
    """--copy hashes every shard as it copies it: a damaged one (same size, one byte changed) stops the merge,
    naming the file, before any manifest is written; once the file is restored the same command replaces what
    the interrupted merge left."""
    _, parts = builds["topk"]
    for p in parts:
        shutil.copytree(p, tmp_path / p.name)
    parts = [tmp_path / p.name for p in parts]
    shard = parts[2] / Cache.open(parts[2]).manifest.shards[-1].file
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(CacheCorruptError, match=f"{re.escape(str(shard))}: SHA-256 differs from the part's manifest"):
        merge_caches(parts, tmp_path / "merged", MergeOptions(copy=True))
    assert not (tmp_path / "merged" / MANIFEST_NAME).exists() and any((tmp_path / "merged" / "shards").iterdir())
    assert not list((tmp_path / "merged" / "shards").glob("*.partial-*"))
    shard.write_bytes(good)
    merge_caches(parts, tmp_path / "merged", MergeOptions(copy=True))
    assert verify_cache(tmp_path / "merged") == []
    assert sorted(p.name for p in (tmp_path / "merged" / "shards").iterdir()) == \
        sorted(s.file.split("/")[1] for s in Cache.open(tmp_path / "merged").manifest.shards)


def test_references_do_not_leave_the_filesystem(builds, tmp_path):
    """Another filesystem (/dev/shm, a tmpfs, where there is one) is refused for references; --copy goes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second writable filesystem")
    _, parts = builds["sample"]
    out = Path(shm) / f"teachercache-test-{os.getpid()}"
    try:
        with pytest.raises(MergeError, match="lies on another filesystem than --out"):
            merge_caches(parts, out / "merged")
        merge_caches(parts, out / "copied", MergeOptions(copy=True))
        assert verify_cache(out / "copied") == []
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_slice_option_is_checked():
    assert Slice.parse("2/3") == Slice(2, 3) and str(Slice(2, 3)) == "2/3"
    assert [g for g in range(10) if Slice(1, 3).holds(g)] == [1, 4, 7]
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(OptionError, match="give i/n with 0 <= i < n"):
            Slice.parse(bad)
    result = CliRunner().invoke(main, ["build", "--teacher", "T", "--data", "D", "--out", "O", "--slice", "3/3"])
    assert result.exit_code == 2 and "give i/n with 0 <= i < n" in result.output


def test_a_slice_with_no_rows_is_refused(teacher, tmp_path):
    with pytest.raises(BuildError, match="--slice 99/100: the slice holds no rows"):
        _build(teacher, tmp_path / "empty", slice="99/100")
