"""--report-to (student/tracking.py): the TensorBoard event files hold every scalar of metrics.jsonl, value for
value, across a resume too; a missing package is named before anything loads."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from teachercache.cli import main
from teachercache.errors import OptionError
from teachercache.format.manifest import TargetSpec
from teachercache.student.checkpoints import checkpoint_path
from teachercache.student.model import TrainError
from teachercache.student.options import CheckpointOptions, EvalOptions, ScheduleOptions, TrainOptions
from teachercache.student.tracking import RUNS_DIR, scalars
from teachercache.student.train import METRICS_FILE, SUMMARY_FILE, train
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracking") / "cache"
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(out), progress=False,
                             data=DataOptions(paths=(str(ROOT / "data" / "corpus" / "valid.parquet"),), seq_len=32,
                                              max_docs=1), targets=TargetSpec(kind="topk", k=8)))
    return out


def _expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard should hold it: every number by name (an evaluation's as eval/NAME) ->
    [(step, value as float32)]; the reference the event files are compared with."""
    series: dict[str, list] = {}
    for line in (out / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        flat = {k: v for k, v in record.items() if k not in ("step", "eval")}
        flat.update({f"eval/{k}": v for k, v in (record.get("eval") or {}).items()})
        for name, value in flat.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(name, []).append((record["step"], float(np.float32(value))))
    return series


def _events(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / RUNS_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(s == t and (x == y or (math.isnan(x) and math.isnan(y)))
                                       for (s, x), (t, y) in zip(a[k], b[k])) for k in a)


def test_tensorboard_holds_every_scalar_of_metrics_jsonl(cache, tmp_path):
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    out = tmp_path / "student"
    options = TrainOptions(cache=str(cache), student="llama-tiny", out=str(out), progress=False, log_every=2,
                           report_to="tensorboard", schedule=ScheduleOptions(steps=6, batch_size=2, warmup_steps=1),
                           eval=EvalOptions(data=str(cache), every=3, rows=4), checkpoints=CheckpointOptions(every=2))
    train(options)
    want = _expected(out)
    assert [s for s, _ in want["loss"]] == [2, 3, 4, 6] and [s for s, _ in want["eval/perplexity"]] == [3, 6]
    assert {"loss", "ce", "kd", "lr", "grad_norm", "eval/perplexity", "eval/kd_loss"} <= want.keys()
    assert _same(_events(out), want)

    # killed after step 6 was logged but before the end, resumed from step 4: steps 5 and 6 are logged again
    # (new seconds), and TensorBoard shows the second run's, as metrics.jsonl does
    shutil.rmtree(checkpoint_path(out, 6))
    (out / SUMMARY_FILE).unlink()
    first = _events(out)
    train(replace(options, checkpoints=CheckpointOptions(every=2, resume=True)))
    want = _expected(out)
    assert [s for s, _ in want["loss"]] == [2, 3, 4, 6]
    assert want["seconds"][-1] != first["seconds"][-1] and _same(_events(out), want)


def test_scalars_are_the_numbers_of_a_record():
    record = {"step": 7, "lr": 1e-3, "loss": 2.5, "ce": 2.0, "kd": 0.5, "hint": 0.0, "grad_norm": None,
              "positions": 12, "seconds": 0.1, "skipped": "non-finite loss or gradient: no update",
              "eval": {"positions": 40, "perplexity": 9.5, "kd_loss": None}}
    assert scalars(record) == {"lr": 1e-3, "loss": 2.5, "ce": 2.0, "kd": 0.5, "hint": 0.0, "positions": 12,
                               "seconds": 0.1, "eval/positions": 40, "eval/perplexity": 9.5}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_package_is_named_before_anything_loads(cache, tmp_path):
    out = tmp_path / "student"
    needs = r"--report-to wandb needs the wandb package, which is not installed: pip install 'teachercache\[wandb\]'"
    with pytest.raises(TrainError, match=needs):
        train(TrainOptions(cache=str(cache), student="llama-tiny", out=str(out), report_to="wandb"))
    assert not out.exists()
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--student", "llama-tiny", "--out", str(out),
                                       "--report-to", "wandb"])
    assert result.exit_code == 1 and "pip install 'teachercache[wandb]'" in result.output, result.output
    with pytest.raises(OptionError, match="report_to \\(--report-to\\) must be one of none, tensorboard, wandb"):
        TrainOptions(cache=str(cache), student="llama-tiny", out=str(out), report_to="mlflow")
