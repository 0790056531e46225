"""`teachercache build` as a job of two torchrun nodes (tests/multinode.py: two launches of `torchrun --nnodes 2
--nproc-per-node 1` joined by the c10d rendezvous on 127.0.0.1, gloo on CPU). The cache the two nodes write
holds the one-process build's rows value for value: row k of rank r is the one-process build's row
2k + r. A slice built by the two nodes shares its rows out the same way and merges with slices built by
one process into the one-job build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import cache_rows, global_row_indices
from multinode import torchrun_two_nodes

from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.format.merge import merge_caches
from teachercache.inspect.verify import verify_cache
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"
SPEC = TargetSpec(kind="sample", k=None, samples=16, seed=7)


def _flags(teacher) -> list[str]:
    return ["--teacher", teacher, "--data", CORPUS, "--seq-len", "48", "--batch-size", "4", "--max-docs", "2",
            "--target", "sample", "--samples", "16", "--seed", "7", "--hidden-layers", "1", "--shard-mb", "0.01",
            "--no-progress"]


def _build(teacher, out, slice=None):
    """What _flags builds, in this process."""
    build_cache(BuildOptions(teacher=str(teacher), out=str(out), slice=slice, batch_size=4, targets=SPEC,
                             hidden_layers=(1,), shard_bytes=int(0.01 * (1 << 20)), progress=False,
                             data=DataOptions(paths=(str(CORPUS),), seq_len=48, max_docs=2)))
    return out


def _assert_rows_are_the_one_process_builds(path, whole: list[dict]):
    """Every row of the cache at ``path`` equals, array for array, the row of the one-process build ``whole``
    at its global index."""
    for g, row in zip(global_row_indices(path), cache_rows(path), strict=True):
        want = whole[g]
        assert row.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(row[name], want[name], err_msg=f"row {g}: {name}")


def test_two_nodes_build_the_cache_of_one_process(tiny_teacher, tmp_path):
    whole = cache_rows(_build(tiny_teacher, tmp_path / "one"))
    torchrun_two_nodes(["build", "--out", tmp_path / "nodes", *_flags(tiny_teacher)], tmp_path / "logs")
    m = Cache.open(tmp_path / "nodes").manifest
    assert m.extra["world_size"] == 2 and {s.file.split("-")[1] for s in m.shards} == {"r000", "r001"}
    assert verify_cache(tmp_path / "nodes") == []
    assert sorted(global_row_indices(tmp_path / "nodes")) == list(range(len(whole))) and len(whole) > 60
    _assert_rows_are_the_one_process_builds(tmp_path / "nodes", whole)
    assert m.data == Cache.open(tmp_path / "one").manifest.data


def test_a_slice_built_by_two_nodes_merges_with_slices_built_alone(tiny_teacher, tmp_path):
    """Slice 1/3 by two ranks (each takes every other row of the slice), slices 0/3 and 2/3 by one process:
    the partition does not depend on the ranks, and the merge is the one-job build."""
    whole = cache_rows(_build(tiny_teacher, tmp_path / "one"))
    torchrun_two_nodes(["build", "--out", tmp_path / "s1", "--slice", "1/3", *_flags(tiny_teacher)], tmp_path / "logs")
    assert Cache.open(tmp_path / "s1").manifest.extra["slice"]["index"] == 1
    _assert_rows_are_the_one_process_builds(tmp_path / "s1", whole)
    parts = [_build(tiny_teacher, tmp_path / "s0", "0/3"), tmp_path / "s1",
             _build(tiny_teacher, tmp_path / "s2", "2/3")]
    merge_caches(parts, tmp_path / "merged")
    assert verify_cache(tmp_path / "merged") == []
    rows = cache_rows(tmp_path / "merged")
    got = [g for part in parts for g in global_row_indices(part)]   # the merge lists slice 0, 1, 2 in turn
    assert sorted(got) == list(range(len(whole))) and len(rows) == len(whole)
    for g, row in zip(got, rows):
        for name in whole[g]:
            np.testing.assert_array_equal(row[name], whole[g][name], err_msg=f"row {g}: {name}")


def test_a_node_without_rows_still_lets_the_manifest_be_written(tiny_teacher, tmp_path):
    """One short document packs into one row: node 1 gets none, closes no shard, and says so in its state file
    (the manifest reads every rank's); the cache is the one-process build's."""
    text = tmp_path / "one.jsonl"
    text.write_text('{"text": "def f(x):\\n    return x + 1\\n"}\n')
    flags = ["--teacher", tiny_teacher, "--data", text, "--seq-len", "48", "--k", "4", "--no-progress"]
    torchrun_two_nodes(["build", "--out", tmp_path / "nodes", *flags], tmp_path / "logs")
    build_cache(BuildOptions(teacher=str(tiny_teacher), out=str(tmp_path / "one"), targets=TargetSpec(kind="topk", k=4),
                             progress=False, data=DataOptions(paths=(str(text),), seq_len=48)))
    m = Cache.open(tmp_path / "nodes").manifest
    assert m.extra["world_size"] == 2 and m.totals.rows == 1 and verify_cache(tmp_path / "nodes") == []
    _assert_rows_are_the_one_process_builds(tmp_path / "nodes", cache_rows(tmp_path / "one"))
