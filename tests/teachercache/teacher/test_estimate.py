"""`build --estimate` (teacher.estimate): the real pass over a sample writes nothing where the build would write,
and its projection for a small corpus lands within 20% of the real build's bytes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from teachercache.cli import main
from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions
from teachercache.teacher.estimate import EstimateOptions, estimate_build

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """tempfile's directory, so that a test can see what the estimate leaves there (nothing)."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


@pytest.mark.parametrize("kind", ["topk", "sample"])
def test_the_estimate_writes_nothing_and_projects_the_real_builds_bytes(tiny_teacher, tmp_path, scratch, kind):
    targets = TargetSpec(kind="topk", k=8) if kind == "topk" else TargetSpec(kind="sample", k=None, samples=16, seed=1)
    options = BuildOptions(teacher=str(tiny_teacher), out=str(tmp_path / "out"), batch_size=4, targets=targets,
                           progress=False, data=DataOptions(paths=(str(CORPUS),), seq_len=48, max_docs=2))
    estimate = estimate_build(options, EstimateOptions(rows=16))
    assert not (tmp_path / "out").exists() and os.listdir(scratch) == []
    real = build_cache(options)
    assert estimate.sample_rows == 16 and estimate.sample_tokens == 16 * 48
    assert (estimate.total_rows, estimate.total_tokens) == (real.rows, real.tokens) and real.rows > 60
    assert abs(estimate.projected_bytes - real.bytes) <= 0.2 * real.bytes, (estimate.projected_bytes, real.bytes)
    assert estimate.tokens_per_second > 0 and estimate.projected_seconds == pytest.approx(
        real.tokens / estimate.tokens_per_second)
    given = estimate_build(options, EstimateOptions(rows=8, tokens=10**9))
    assert given.total_rows is None and given.total_tokens == 10**9
    assert given.projected_bytes == pytest.approx(given.bytes_per_token * 1e9)


def test_the_estimate_command_prints_the_bill_and_leaves_out_untouched(tiny_teacher, tmp_path, scratch):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["build", "--teacher", str(tiny_teacher), "--data", str(CORPUS), "--seq-len", "48", "--max-docs", "2",
            "--batch-size", "4", "--k", "8", "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--estimate", "--estimate-rows", "8", "--slice", "0/4"])
    assert result.exit_code == 0, result.output
    for text in ("first 8 rows of --data", "bytes/token", "tokens/s", "tokens (counted: 71 rows", "projected size",
                 "projected time", "per slice of 4", "nothing was written to --out"):
        assert text in result.output, (text, result.output)
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert os.listdir(scratch) == []
    result = CliRunner().invoke(main, [*args, "--estimate", "--estimate-tokens", "5000000"])
    assert result.exit_code == 0 and "5,000,000 tokens (given by --estimate-tokens)" in result.output, result.output
    result = CliRunner().invoke(main, [*args, "--estimate-rows", "8"])
    assert result.exit_code == 2 and "add --estimate" in result.output
    assert os.listdir(out) == ["notes.txt"]
