"""The CLI: every command documents itself; `python -m teachercache` works."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from teachercache.cli import main


def test_every_command_has_help_text():
    runner = CliRunner()
    for name, command in main.commands.items():
        assert command.help and len(command.help) > 20, name
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
