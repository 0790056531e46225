"""Issue 18 on the build side, with the demo teacher and real files: nothing lost, nothing mixed.

A resumed build with any option that decides the cache's content changed is refused (each change listed)
and touches nothing; one with only safe options changed ends equal to a build that never stopped. Every
cache directory carries its marker; --overwrite deletes only a cache's own entries and refuses anything
else. Bad records, compressed and ignored inputs, an --out inside --data, a read-only --out, a failed
build's rerun, and every numeric option out of range."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from teachercache.cli import main
from teachercache.errors import OptionError
from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.format.outputs import MARKER, OutputError, read_marker
from teachercache.inspect.verify import verify_cache
from teachercache.teacher.build import SAFE, BuildError, BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions
from teachercache.teacher.targets import TargetOptions

ROOT = Path(__file__).resolve().parents[3]
TEACHER = ROOT / "data" / "teacher"
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"


@pytest.fixture(scope="module")
def texts():
    return pq.read_table(CORPUS, columns=["text"]).column("text").to_pylist()[:6]


@pytest.fixture(scope="module")
def stops(tmp_path_factory, texts):
    """A corpus whose fifth line is not JSON: a build with --max-bad-records 0 stops there, after shards."""
    path = tmp_path_factory.mktemp("corpus") / "stops.jsonl"
    lines = [json.dumps({"text": t}) for t in texts[:4]] + ["{not json"] + [json.dumps({"text": t}) for t in texts[4:]]
    path.write_text("\n".join(lines) + "\n")
    return path


def _options(out, data, **kw) -> BuildOptions:
    data = DataOptions(paths=tuple(map(str, data if isinstance(data, list) else [data])), seq_len=kw.pop("seq_len", 64),
                       max_docs=kw.pop("max_docs", None), max_bad_records=kw.pop("max_bad_records", "1%"))
    kw.setdefault("targets", TargetSpec(kind="topk", k=16))
    return BuildOptions(teacher=str(TEACHER), data=data, out=str(out), progress=False, shard_bytes=12_000, **kw)


def _files(path: Path) -> dict:
    """Every file under ``path`` and its bytes (what a refused command must leave as it was)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _shards(path) -> list:
    return [(s.file, s.sha256) for s in Cache.open(path).manifest.shards]


def test_resume_refuses_every_content_option_changed_and_takes_the_safe_ones(tmp_path, stops):
    out = tmp_path / "cut"
    with pytest.raises(BuildError, match=rf"too many bad records: 1 of the 5 documents read so far.*every one is "
                                         rf"listed in {out}/skipped.jsonl.*run the same command with --resume"):
        build_cache(_options(out, stops, max_bad_records="0"))
    state = json.loads((out / "state" / "rank-000.json").read_text())
    assert len(state["shards"]) >= 3 and not (out / "manifest.json").exists()
    assert read_marker(out)["options"]["targets.k"] == 16 and (out / "skipped.jsonl").exists()
    before = _files(out)

    for change, listed in (({"targets": TargetSpec(kind="topk", k=4)}, "targets.k: 16 -> 4"),
                           ({"seq_len": 48}, "data.seq_len: 64 -> 48"),
                           ({"batch_size": 4}, "batch_size: 8 -> 4"),
                           ({"zstd_level": 3}, "zstd_level: 1 -> 3"),
                           ({"hidden_layers": (1,)}, "hidden_layers: [] -> [1]")):
        with pytest.raises(OutputError, match=f"--resume with other options than the run it continues: .*{listed}"):
            build_cache(_options(out, stops, max_bad_records="0", resume=True, **change))
    with pytest.raises(OutputError, match=r"data.fingerprint: '[0-9a-f]{16}' -> '[0-9a-f]{16}'; data.paths: \["):
        build_cache(_options(out, CORPUS, max_bad_records="0", resume=True))
    assert _files(out) == before  # refused before anything was loaded or written

    # the safe options (progress, queue_batches, max_bad_records) may change: the end equals a whole build
    build_cache(_options(out, stops, max_bad_records="10", resume=True, queue_batches=1))
    build_cache(_options(tmp_path / "whole", stops, max_bad_records="10"))
    assert _shards(out) == _shards(tmp_path / "whole") and verify_cache(out, deep=True) == []
    assert (out / "skipped.jsonl").read_text() == (tmp_path / "whole" / "skipped.jsonl").read_text() == \
        json.dumps({"file": str(stops), "line": 5, "reason": "not JSON (Expecting property name enclosed in double "
                    "quotes at column 2)"}) + "\n"
    m = Cache.open(out).manifest
    assert m.data.documents_read == 7 and m.data.documents_skipped == {"undecodable": 1}
    assert m.extra["bad_records"] == 1 and m.extra["skipped_report"] == "skipped.jsonl"
    assert SAFE == {"out", "resume", "overwrite", "progress", "queue_batches", "data.max_bad_records"}


KILLED = [sys.executable, "-m", "teachercache", "build", "--teacher", str(TEACHER), "--data", str(CORPUS),
          "--seq-len", "64", "--max-docs", "3", "--batch-size", "2", "--shard-mb", "0.01", "--no-progress"]


def test_a_killed_cli_build_resumed_with_another_k_is_refused_and_nothing_is_mixed(tmp_path):
    out = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(KILLED + ["--k", "16", "--out", str(out)], env=env, stderr=subprocess.DEVNULL)
    state, deadline = out / "state" / "rank-000.json", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and (out / MARKER).exists()
    before = _files(out)
    for flags, listed in ((["--k", "4"], "targets.k: 16 -> 4"), (["--k", "16", "--seq-len", "48"],
                                                                  "data.seq_len: 64 -> 48")):
        result = CliRunner().invoke(main, KILLED[3:] + flags + ["--out", str(out), "--resume"])
        assert result.exit_code == 1 and result.output.startswith("Error: ") and listed in result.output, result.output
    assert _files(out) == before
    result = CliRunner().invoke(main, KILLED[3:] + ["--k", "16", "--out", str(out), "--resume", "--progress"])
    assert result.exit_code == 0, result.output
    assert verify_cache(out, deep=True) == []
    for batch in Cache.open(out).iter_batches():
        assert set(np.diff(batch.target_offsets).tolist()) == {16}  # every shard: 16 ids per position


def test_overwrite_deletes_only_a_cache_and_its_own_entries(tmp_path, texts):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    data = tmp_path / "one.jsonl"
    build_cache(_options(tmp_path / "c", data))
    (tmp_path / "c" / "notes.md").write_text("mine")  # something the user put beside the cache
    build_cache(_options(tmp_path / "c", data, overwrite=True, targets=TargetSpec(kind="topk", k=4)))
    assert (tmp_path / "c" / "notes.md").read_text() == "mine"
    assert read_marker(tmp_path / "c")["options"]["targets.k"] == 4 and verify_cache(tmp_path / "c") == []

    project = tmp_path / "project"  # not a cache: refused with or without --overwrite, nothing deleted
    (project / "src").mkdir(parents=True)
    (project / "main.py").write_text("print(1)")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0")
    for target, what in ((project, r"files teachercache did not write \(main.py, src\)"),
                         (model, r"a model directory \(config.json, model.safetensors\)")):
        before = _files(target)
        for flags in ({"overwrite": True}, {"resume": True}, {}):
            with pytest.raises(OutputError, match=f"{target}: not a teachercache cache but {what}; teachercache will "
                                                  "not write into it"):
                build_cache(_options(target, data, **flags))
        assert _files(target) == before

    legacy = tmp_path / "legacy"  # a cache of release 0.2, before markers: known by its manifest
    build_cache(_options(legacy, data))
    (legacy / MARKER).unlink()
    with pytest.raises(BuildError, match="not empty; add --resume"):
        build_cache(_options(legacy, data))
    with pytest.raises(BuildError, match="already complete"):
        build_cache(_options(legacy, data, resume=True))
    build_cache(_options(legacy, data, overwrite=True))
    assert read_marker(legacy)["kind"] == "cache"


def test_a_failed_build_is_rerun_without_flags_and_resume_of_nothing_starts(tmp_path, texts, capsys):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    out = tmp_path / "c"
    with pytest.raises(BuildError, match="the corpus gave no rows .*no shard was written: correct --data and run the "
                                         "same command again"):
        build_cache(_options(out, tmp_path / "empty.jsonl"))
    assert (out / MARKER).exists() and not list((out / "shards").iterdir())
    build_cache(_options(out, tmp_path / "one.jsonl"))  # no shard was closed: nothing to lose, replaced
    assert "stopped before its first shard; replacing it" in capsys.readouterr().err
    assert verify_cache(out) == [] and read_marker(out)["options"]["data.paths"] == [str(tmp_path / "one.jsonl")]

    build_cache(_options(tmp_path / "never", tmp_path / "one.jsonl", resume=True))
    assert "nothing to resume yet" in capsys.readouterr().err and verify_cache(tmp_path / "never") == []


def test_bad_compressed_and_ignored_inputs_in_a_real_build(tmp_path, texts, capsys):
    d = tmp_path / "data"
    d.mkdir()
    lines = [json.dumps({"text": t}) for t in texts[:2]] + ['{"text": "lone \\ud83d"}', "[" * 50_000 + "]" * 50_000]
    (d / "a.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (d / "b.JSONL").write_text("".join(json.dumps({"text": "x"}) + "\n" if i % 2 else "{bad\n" for i in range(24)))
    (d / "notes.csv").write_text("a,b\n")
    result = build_cache(_options(tmp_path / "c", d, max_bad_records="20"))
    err = capsys.readouterr().err
    assert f"note: {d / 'notes.csv'}: ignored: not a file type the build reads" in err
    assert f"note: skipped {d / 'a.jsonl.gz'}:3: a lone surrogate (\\ud83d) in field 'text'" in err
    assert f"note: skipped {d / 'a.jsonl.gz'}:4: JSON nested too deeply to decode" in err
    assert err.count("note: skipped") == 10 and "more bad records: they are listed in" in err
    report = [json.loads(line) for line in (tmp_path / "c" / "skipped.jsonl").read_text().splitlines()]
    assert len(report) == 1 + 14 and report[0]["file"] == str(d / "notes.csv") and report[0]["line"] is None
    assert [r["line"] for r in report[3:]] == list(range(1, 24, 2))
    assert result.bad_records == 14 and result.ignored_files == 1
    m = Cache.open(tmp_path / "c").manifest
    assert (m.data.documents_read, m.data.documents_used) == (28, 14)
    assert m.data.documents_skipped == {"undecodable": 14} and m.extra["ignored_files"] == 1


def test_paths_that_would_read_or_delete_each_other_are_refused_before_anything_runs(tmp_path, texts):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    for out in (d / "cache", d):
        with pytest.raises(BuildError, match=f"--out {out} lies inside --data {d}: the pass would read the cache's "
                                             "own files"):
            build_cache(_options(out, d))
    assert not (d / "cache").exists() and sorted(p.name for p in d.iterdir()) == ["a.jsonl"]
    with pytest.raises(BuildError, match=f"--data {d / 'a.jsonl'} lies inside --out {d}: .*could delete it"):
        build_cache(_options(d, d / "a.jsonl", overwrite=True))


def test_a_read_only_out_is_a_clear_error(tmp_path, texts):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    if os.geteuid() == 0:  # root writes anywhere chmod allows nothing: /sys refuses every new directory
        out = Path("/sys/teachercache-test-out")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "cache"
    with pytest.raises(BuildError, match=f"{out}: cannot write there .*choose another --out or fix its permissions"):
        build_cache(_options(out, tmp_path / "one.jsonl"))


CLI = ["build", "--teacher", str(TEACHER), "--data", str(CORPUS), "--no-progress"]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "inf"], "'inf' is not a finite number"), (["--temperature", "nan"], "'nan' is not a finite"),
    (["--temperature", "0"], "0.0 is not in the range 0.0001<=x<=10000"), (["--shard-mb", "nan"], "not a finite"),
    (["--shard-mb", "inf"], "'inf' is not a finite number"), (["--shard-mb", "0"], "not in the range 0<x<=1048576"),
    (["--top-p", "nan"], "'nan' is not a finite"), (["--top-p", "1.5"], "not in the range 0<x<=1"),
    (["--k", "0"], "0 is not in the range 1<=x<=65535"), (["--samples", "70000"], "not in the range 1<=x<=65535"),
    (["--min-k", "0"], "not in the range"), (["--max-k", "-3"], "not in the range"), (["--seed", "-1"], "x<="),
    (["--zstd-level", "99"], "not in the range 1<=x<=22"), (["--seq-len", "1"], "1 is not in the range x>=2"),
    (["--batch-size", "0"], "x>=1"), (["--max-docs", "0"], "0 is not in the range x>=1"),
    (["--hidden-layers", "2,2"], "'2,2': layer 2 is given twice; name each layer once"),
    (["--hidden-layers", "-1"], "hidden-state indices are >= 0"),
    (["--max-bad-records", "x"], "'x': give a count of records"), (["--max-bad-records", "nan%"], "give a count"),
])
def test_the_cli_refuses_every_numeric_option_out_of_range(tmp_path, flags, message):
    result = CliRunner().invoke(main, CLI + ["--out", str(tmp_path / "c")] + flags)
    assert result.exit_code == 2 and "Invalid value for" in result.output and message in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_the_options_dataclasses_refuse_what_the_cli_refuses():
    data = DataOptions(paths=("x",))
    for kwargs, match in (({"batch_size": 0}, "batch_size"), ({"shard_bytes": math.nan}, "shard_bytes"),
                          ({"shard_bytes": math.inf}, "shard_bytes"), ({"zstd_level": 23}, "zstd_level"),
                          ({"queue_batches": 0}, "queue_batches"),
                          ({"hidden_layers": (2, 2)}, "--hidden-layers 2,2: layer 2 is given twice"),
                          ({"hidden_layers": (-1,)}, "hidden-state indices >= 0"),
                          ({"resume": True, "overwrite": True}, "--resume and --overwrite together"),
                          ({"targets": TargetSpec(temperature=math.inf)}, "--temperature must be a finite number"),
                          ({"targets": TargetSpec(temperature=math.nan)}, "--temperature must be a finite number"),
                          ({"targets": TargetSpec(kind="topk", k=0)}, r"--k must be in \[1, 65535\]"),
                          ({"targets": TargetSpec(kind="nucleus", top_p=math.nan, min_k=1, max_k=8)}, "--top-p"),
                          ({"targets": TargetSpec(kind="sample", k=None, samples=8, seed=None)}, "--seed")):
        with pytest.raises((BuildError, OptionError), match=match):
            BuildOptions(teacher="t", data=data, out="o", **kwargs)
    for kwargs, match in (({"temperature": math.inf}, "temperature"), ({"top_p": math.nan}, "top_p"),
                          ({"k": 0}, "k"), ({"samples": 0}, "samples"), ({"seed": -1}, "seed"),
                          ({"min_k": 1.5}, "min_k"), ({"kind": "beam"}, "--target 'beam'")):
        with pytest.raises(OptionError, match=match):
            TargetOptions(**kwargs)
