"""Shared fixtures of the teachercache tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[2]
DEMO_TEACHER = ROOT / "data" / "teacher"
VALID = ROOT / "data" / "corpus" / "valid.parquet"


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A real cache: the bundled demo teacher over the first document of the held-out corpus, seq_len 64,
    top-16 targets (a few seconds on CPU). Read it, never modify it: copy it first."""
    out = tmp_path_factory.mktemp("demo") / "cache"
    build_cache(BuildOptions(teacher=str(DEMO_TEACHER), out=str(out), batch_size=8, progress=False,
                             targets=TargetSpec(kind="topk", k=16),
                             data=DataOptions(paths=(str(VALID),), seq_len=64, max_docs=1)))
    return out


@pytest.fixture(scope="session")
def doc_rows():
    """doc_rows(cache_dir) -> every row of the cache decoded by the decoder printed in docs/FORMAT.md
    (pyarrow + numpy, no teachercache code): an independent reference for the inspection tools."""
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "FORMAT.md").read_text(), re.S)[-1]
    namespace: dict = {}
    exec(compile(code, "FORMAT.md", "exec"), namespace)

    def rows(cache_dir) -> list[dict]:
        cache = Cache.open(cache_dir)
        return [row for i in range(len(cache.shards)) for row in namespace["decode_shard"](str(cache.shard_path(i)))]

    return rows
