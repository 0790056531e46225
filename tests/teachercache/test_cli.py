"""The CLI: every command documents itself; `python -m teachercache` works."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from teachercache.cli import main


def test_every_command_has_help_text():
    runner = CliRunner()
    for name, command in main.commands.items():
        assert command.help and len(command.help) > 20, name
        assert all(p.help for p in command.params if isinstance(p, click.Option)), name
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_every_command_help_has_an_example():
    """Every command of the group, including ones added later, shows a runnable example in --help."""
    runner = CliRunner()
    for name, command in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        example = result.output.split("Example:", 1)
        assert len(example) == 2, f"`teachercache {name} --help` has no 'Example:' paragraph"
        assert f"teachercache {name}" in example[1].split("Options:")[0], name


def test_python_dash_m_runs_the_same_group():
    out = subprocess.run([sys.executable, "-m", "teachercache", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "verify" in out.stdout and "inspect" in out.stdout


def test_flag_defaults_and_help_come_from_the_options_dataclasses():
    """Defaults are written once: every train flag that fills TrainOptions (directly or in a group) shows
    that field's default and its docstring, and `split_groups` puts the value back where it came from."""
    import dataclasses

    from click import Context

    from teachercache.student.options import TrainOptions
    from teachercache.cli.options import field_docs, split_groups
    from teachercache.cli.student import GROUPS, train_command

    checked = 0
    for param in train_command.params:
        group, _, name = param.name.rpartition("__")
        cls = GROUPS[group] if group else TrainOptions
        spec = {f.name: f for f in dataclasses.fields(cls)}.get(name)
        if spec is None or spec.default is dataclasses.MISSING:
            continue
        assert param.get_default(Context(train_command)) == spec.default, param.name
        if name not in ("trust_remote_code", "progress"):    # these two say which model / bar
            assert param.help == field_docs(cls)[name], param.name
        checked += 1
    assert checked >= 30
    top, groups = split_groups({"kd__ce_weight": 0.5, "schedule__lr": 0.1, "seed": 3})
    assert top == {"seed": 3} and groups == {"kd": {"ce_weight": 0.5}, "schedule": {"lr": 0.1}}


def test_train_flags_reach_the_nested_options(tmp_path, monkeypatch):
    """--ce-alpha, --lr, --no-shuffle and --eval-every land in kd, schedule, loader and eval."""
    import teachercache.student.train

    seen = {}

    def capture(options):
        seen["options"] = options
        raise SystemExit(0)

    monkeypatch.setattr(teachercache.student.train, "train", capture)
    result = CliRunner().invoke(main, ["train", "--cache", str(tmp_path), "--student", "llama-tiny", "--out",
                                       str(tmp_path / "o"), "--ce-alpha", "0.25", "--lr", "0.01", "--no-shuffle",
                                       "--eval-every", "7", "--skew-alpha", "0.2", "--hint-layers", "1:2"])
    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert (options.kd.ce_weight, options.kd.alpha, options.schedule.lr) == (0.25, 0.2, 0.01)
    assert options.loader.shuffle is False and options.eval.every == 7 and options.hint.layers == "1:2"
    assert options.kd.kd_weight == 1.0 and options.schedule.steps == 1000


@pytest.mark.parametrize("args, message", [
    (["show", "CACHE", "--row", "-1"], "Invalid value for '--row': -1 is not in the range x>=0"),
    (["show", "CACHE", "--row", "0", "--top", "0"], "Invalid value for '--top': 0 is not in the range x>=1"),
    (["diff", "CACHE", "CACHE", "--worst", "-1"], "Invalid value for '--worst'"),
    (["stepbystep", "a.jsonl", "b.jsonl", "--label-repeat", "-1"], "Invalid value for '--label-repeat'"),
    (["import-vllm", "a.jsonl", "--tokenizer", "T", "--out", "O", "--k", "0"], "Invalid value for '--k'"),
    (["import-api", "a.jsonl", "--tokenizer", "T", "--out", "O", "--max-unmapped", "nan"], "is not a finite number"),
    (["demo", "--out", "OUT", "--steps", "0"], "demo: steps (--steps) must be a finite integer in [1, inf], got 0"),
    (["demo", "--out", "OUT", "--eval-every", "-1"], "demo: eval_every (--eval-every) must be a finite integer"),
    (["demo", "--out", "OUT", "--max-docs", "0"], "demo: max_docs (--max-docs) must be a finite integer in [1, inf]"),
])
def test_every_numeric_option_is_range_checked_before_any_work(tmp_path, args, message):
    # (issue 18, item 7) each refused before a file is opened or a model loaded: exit 1 or 2, one line
    args = [str(tmp_path / "x") if a in ("CACHE", "T", "O", "OUT") else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert not (tmp_path / "x").exists()
