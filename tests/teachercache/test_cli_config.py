"""--config FILE.yaml (teachercache/cli/config.py): keys, sections, command-line overrides, refusals that name
the file and the nearest key, and the config.yaml a build or a training run saves, which runs it again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from teachercache.cli import main
from teachercache.cli.cache import build_command
from teachercache.cli.config import CONFIG_FILE
from teachercache.cli.student import demo_command, train_command
from teachercache.student.demo import DemoOptions
from teachercache.student.options import ScheduleOptions
from teachercache.teacher.build import BuildOptions, _clear

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "data" / "teacher"
VALID = ROOT / "data" / "corpus" / "valid.parquet"


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _parse(command, args) -> dict:
    """The values ``command`` would be called with (nothing runs)."""
    with command.make_context(command.name, list(args)) as ctx:
        return ctx.params


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_keys_are_flag_names_or_sections_and_flags_given_win(tmp_path):
    config = _yaml(tmp_path / "build.yaml", """
teacher: T
out: O
data: {paths: a.jsonl, seq-len: 128, max_docs: 5}
target: nucleus
targets: {top_p: 0.9}
k: 32
hidden_layers: [3, 6]
shard-mb: 0.5
zstd_level: 7
""")
    values = _parse(build_command, ["--config", config, "--k", "16", "--seq-len", "64"])
    assert values["data__paths"] == ("a.jsonl",) and values["data__max_docs"] == 5
    assert values["data__seq_len"] == 64 and values["targets__k"] == 16            # the command line wins
    assert (values["targets__kind"], values["targets__top_p"]) == ("nucleus", 0.9)
    assert values["hidden_layers"] == (3, 6) and values["shard_mb"] == 0.5 and values["zstd_level"] == 7
    assert values["batch_size"] == BuildOptions.batch_size and values["teacher"] == "T"   # left out: the default

    config = _yaml(tmp_path / "train.yaml", """
cache: C
student: llama-tiny
out: O
schedule: {lr: 3e-3, steps: 5}
kd: {ce_alpha: 0.25, loss: jsd}
kd.temperature: 2
hint_layers: 2:4
eval-every: 7
shuffle: false
report_to: tensorboard
online_teacher: null
""")
    values = _parse(train_command, ["--config", config, "--steps", "9"])
    assert (values["schedule__lr"], values["schedule__steps"]) == (0.003, 9)
    assert values["schedule__batch_size"] == ScheduleOptions.batch_size
    assert (values["kd__ce_weight"], values["kd__loss"], values["kd__temperature"]) == (0.25, "jsd", 2.0)
    assert values["hint__layers"] == "2:4"      # not YAML 1.1's base-60 integer 124
    assert values["eval__every"] == 7 and values["loader__shuffle"] is False and values["report_to"] == "tensorboard"
    assert values["online_teacher"] is None

    values = _parse(demo_command, ["--config", _yaml(tmp_path / "demo.yaml", "steps: 3\nmax-docs: 2\n")])
    assert (values["steps"], values["max_docs"], values["eval_every"]) == (3, 2, DemoOptions.eval_every)


@pytest.mark.parametrize("command, text, message", [
    ("build", "seq_lenn: 64", "unknown key 'seq_lenn'; did you mean 'seq_len'?"),
    ("build", "targets: {kk: 4}", "unknown key 'targets.kk'; did you mean 'targets.k'?"),
    ("build", "target: {kind: topk}", "'target' takes a value, not a mapping (the sections are: data, targets)"),
    ("build", "targetz: {kind: topk}", "unknown section 'targetz'; did you mean 'targets'?"),
    ("train", "kd: 0.5", "'kd' is a section: give its options as a mapping"),
    ("train", "schedule: {step: 5}", "unknown key 'schedule.step'; did you mean 'schedule.steps'?"),
    ("train", "ce_weight: 0.1", "unknown key 'ce_weight'; did you mean 'kd.ce_weight'?"),
    ("build", "seq_len: 64\ndata: {seq_len: 32}", "'data.seq_len' sets the same option as 'seq_len'; give it once"),
    ("build", "k: 4\nk: 8", "key 'k' is given twice"),
    ("build", "- k: 4", "holds a list; give a mapping of option names to values"),
    ("build", "k: [4", "not valid YAML"),
    ("build", "1: 4", "key 1 is not an option name"),
    ("train", "lr: {peak: 1}",
     "'lr' takes a value, not a mapping (the sections are: checkpoints, eval, hint, kd, loader, schedule)"),
    ("build", "config: other.yaml", "unknown key 'config'"),
])
def test_a_bad_file_is_refused_naming_it_the_key_and_the_nearest_one(tmp_path, command, text, message):
    config = _yaml(tmp_path / "run.yaml", text)
    required = ["--cache", "C", "--student", "S"] if command == "train" else ["--teacher", "T", "--data", "D"]
    code, output = _invoke(command, "--config", config, *required, "--out", tmp_path / "o")
    output = " ".join(output.split())
    assert code == 2 and "Invalid value for '--config'" in output and config in output and message in output, output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, message", [
    ("k: abc", "Invalid value for '--k': 'abc' is not a valid integer range. (set by 'k' in {})"),
    ("targets: {k: 0}", "Invalid value for '--k': 0 is not in the range 1<=x<=65535. (set by 'targets.k' in {})"),
    ("hidden_layers: [3, 3]", "layer 3 is given twice; name each layer once (set by 'hidden_layers' in {})"),
    ("target: topk-ish", "'topk-ish' is not one of"),
    ("seq_len: 1", "1 is not in the range x>=2. (set by 'seq_len' in {})"),
])
def test_a_value_click_refuses_names_the_file_and_key(tmp_path, text, message):
    config = _yaml(tmp_path / "run.yaml", text)
    code, output = _invoke("build", "--config", config, "--teacher", "T", "--data", "D", "--out", tmp_path / "o")
    assert code == 2 and message.format(config) in " ".join(output.split()), output


def test_a_build_saves_its_config_and_the_config_builds_the_same_cache(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    code, output = _invoke("build", "--teacher", TEACHER, "--data", VALID, "--out", first, "--seq-len", "32",
                           "--max-docs", "2", "--target", "topk", "--k", "8", "--batch-size", "2", "--shard-mb", "0.01",
                           "--hidden-layers", "1,2", "--zstd-level", "5", "--no-progress")
    assert code == 0, output
    saved = yaml.safe_load((first / CONFIG_FILE).read_text())
    assert saved["data"]["paths"] == [str(VALID)] and saved["data"]["seq_len"] == 32 and saved["data"]["max_docs"] == 2
    assert saved["targets"]["kind"] == "topk" and saved["targets"]["k"] == 8 and saved["hidden_layers"] == [1, 2]
    assert saved["shard_mb"] == 0.01 and saved["batch_size"] == 2 and saved["out"] == str(first)
    assert saved["progress"] is False and saved["device"] == "auto"
    assert "resume" not in saved and "overwrite" not in saved       # run control: a re-run must be told
    assert "--resume, --overwrite" in (first / CONFIG_FILE).read_text().split("\n", 3)[2]

    code, output = _invoke("build", "--config", first / CONFIG_FILE, "--out", second)
    assert code == 0, output
    shards = sorted(p.name for p in (first / "shards").iterdir())
    assert len(shards) > 1 and shards == sorted(p.name for p in (second / "shards").iterdir())
    for name in shards:
        assert (first / "shards" / name).read_bytes() == (second / "shards" / name).read_bytes(), name
    assert yaml.safe_load((second / CONFIG_FILE).read_text()) == {**saved, "out": str(second)}

    # the config names the first cache as --out, and --overwrite is left out: running it as is changes nothing
    before = (first / "manifest.json").read_bytes()
    code, output = _invoke("build", "--config", first / CONFIG_FILE)
    assert code == 1 and "add --resume" in output and (first / "manifest.json").read_bytes() == before, output
    # --overwrite deletes it with the cache's own files (a replacement killed midway leaves no stale config)
    (first / "notes.txt").write_text("mine")
    _clear(first)
    assert not (first / CONFIG_FILE).exists() and (first / "notes.txt").read_text() == "mine"


def test_a_training_run_saves_its_config_and_the_config_trains_the_same_weights(tmp_path, demo_cache):
    first, second = tmp_path / "first", tmp_path / "second"
    code, output = _invoke("train", "--cache", demo_cache, "--student", "llama-tiny", "--out", first, "--steps", "4",
                           "--batch-size", "2", "--lr", "0.003", "--warmup-steps", "1", "--ce-alpha", "0.1",
                           "--temperature", "2", "--tail", "renormalize", "--seed", "3", "--checkpoint-every", "2",
                           "--log-every", "1", "--no-progress")
    assert code == 0, output
    saved = yaml.safe_load((first / CONFIG_FILE).read_text())
    assert saved["schedule"]["steps"] == 4 and saved["schedule"]["lr"] == 0.003 and saved["seed"] == 3
    assert saved["kd"]["ce_weight"] == 0.1 and saved["kd"]["temperature"] == 2.0 and saved["kd"]["loss"] is None
    assert saved["checkpoints"] == {"every": 2} and saved["report_to"] == "none"    # --resume left out

    code, output = _invoke("train", "--config", first / CONFIG_FILE, "--out", second)
    assert code == 0, output
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((second / CONFIG_FILE).read_text()) == {**saved, "out": str(second)}

    code, output = _invoke("train", "--config", first / CONFIG_FILE)   # into the first run: refused, untouched
    assert code == 1 and "add --resume" in output, output
    assert all(torch.equal(a[k], v) for k, v in load_file(first / "model.safetensors").items())
