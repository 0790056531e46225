"""`teachercache inspect`: the numbers it prints agree with the data written."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from helpers import random_batch, write_cache

from teachercache.cli import main
from teachercache.format import schema as S
from teachercache.inspect.report import inspect_cache


def test_inspect_reports_what_was_written(tmp_path):
    rng = np.random.default_rng(2)
    layout = S.Layout(vocab_size=4000, hidden_layers=(3,), hidden_width=16)
    batches = [random_batch(rng, layout, [32, 32], k=8) for _ in range(3)]
    manifest = write_cache(tmp_path / "c", batches, layout, shard_bytes=20_000)
    report = inspect_cache(tmp_path / "c")
    assert report["totals"]["rows"] == 6 and report["totals"]["tokens"] == 192
    assert report["totals"]["bytes"] == sum(p.stat().st_size for p in (tmp_path / "c" / "shards").iterdir())
    assert report["shards"] == len(manifest.shards)
    assert report["bytes_per_token"] == report["totals"]["bytes"] / 192
    by_column = report["bytes_per_token_by_column"]
    assert set(by_column) == set(layout.columns())
    assert abs(sum(by_column.values()) - report["bytes_per_token"]) < 1e-9
    assert by_column[S.hidden_column(3)] > by_column[S.TARGET_SIZES]  # 16 floats vs a constant 8
    k = report["ids_per_position"]
    assert k["min"] == k["max"] == 8 and k["count"] == sum(int(b.target_mask.sum()) for b in batches)
    want_captured = np.concatenate([1 - b.rest_mass for b in batches]).mean()
    assert abs(report["captured_mass"]["mean"] - want_captured) < 1e-4

    runner = CliRunner()
    as_json = json.loads(runner.invoke(main, ["inspect", str(tmp_path / "c"), "--json"]).output)
    assert as_json["totals"] == report["totals"]
    text = runner.invoke(main, ["inspect", str(tmp_path / "c")]).output
    assert "bytes/token" in text and "hidden_3" in text and "topk" in text


def test_inspect_of_an_incomplete_cache_is_a_clear_error(tmp_path):
    (tmp_path / "c" / "shards").mkdir(parents=True)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "manifest.json: missing" in result.output
