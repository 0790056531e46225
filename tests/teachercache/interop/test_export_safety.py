"""`export` never writes into its source and replaces only an earlier export (issue 18, item 1): each case
runs the real command on a copy of a real cache and checks that nothing else changed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teachercache.interop.export import EXPORT_KEY


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "teachercache", "export", *map(str, args)], capture_output=True,
                          text=True)


@pytest.fixture
def victim(demo_cache, tmp_path) -> Path:
    copy = tmp_path / "victim"
    shutil.copytree(demo_cache, copy)
    return copy


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_an_export_never_writes_into_or_over_its_source(victim, where):
    before = _snapshot(victim)
    out = {"itself": victim, "inside": victim / "shards" / "kd.parquet", "parent": victim.parent}[where]
    proc = _export(victim, "--out", out, "--overwrite")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the export would be written into (or over) its own source cache" in proc.stderr
    assert _snapshot(victim) == before
    assert not list(victim.parent.glob("*partial*"))


def test_overwrite_replaces_only_an_earlier_export(demo_cache, tmp_path):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    notes = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), notes)
    for out, message in ((project, "a directory, not an exported parquet file"),
                         (notes, "not a teachercache export (no 'teachercache' metadata)")):
        before = out.read_bytes() if out.is_file() else _snapshot(out)
        proc = _export(demo_cache, "--out", out, "--overwrite")
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
        assert (out.read_bytes() if out.is_file() else _snapshot(out)) == before
    # an earlier export is replaced, and the new file says what it is
    out = tmp_path / "kd.parquet"
    assert _export(demo_cache, "--out", out).returncode == 0
    proc = _export(demo_cache, "--out", out)
    assert proc.returncode == 1 and "already exists; add --overwrite" in proc.stderr
    assert _export(demo_cache, "--out", out, "--overwrite").returncode == 0
    assert EXPORT_KEY in pq.read_schema(out).metadata
    assert not list(tmp_path.glob(".kd.parquet.partial*"))
