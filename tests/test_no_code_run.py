"""No command runs code it finds in a cache or a user's path, and none asks about it on stdin.

The hostile inputs: a real cache (the demo teacher over one held-out document) whose
``tokenizer/tokenizer_config.json`` names ``tokenizer_evil.EvilTokenizer`` in an ``auto_map``, with
``tokenizer_evil.py`` beside it; the demo teacher's directory with the same two files (a user model). Importing
``tokenizer_evil`` writes a sentinel file. transformers, asked without ``trust_remote_code``, prompts "run the
custom code? [y/N]" on stdin and runs it on ``y``: every teachercache call passes ``trust_remote_code=`` itself.

Every command of ``teachercache --help`` that opens a cache, a tokenizer or a model runs as a real process
(``python -m teachercache``) with stdin closed, offline, under a timeout: the sentinel is never written, no
prompt is printed, nothing ends in a traceback. A command may refuse the hostile input with an ``Error:``
line (``verify``: a ``FAULT`` line), exit code 1, or never load the tokenizer at all (exit code 0). Not run:
``stepbystep`` (reads and writes JSON Lines only, no tokenizer or model). ``--trust-remote-code``, offered by
the commands that load a user's model (build, generate, train, eval), is the only way the code runs:
``eval --trust-remote-code`` on the hostile model writes the sentinel. No command offers the flag for a
cache's own tokenizer: ``train --trust-remote-code`` lets the student repository run code, never the cache's
tokenizer copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data" / "teacher"
VALID = ROOT / "data" / "corpus" / "valid.parquet"
FIXTURES = ROOT / "tests" / "fixtures"
TIMEOUT = 240   # seconds; a command waiting for an answer on stdin would hit it
PROMPT = "Do you wish to run the custom code"   # transformers' question

EVIL = '''"""Imported only if someone runs the code a hostile tokenizer names."""
import pathlib
import sys

pathlib.Path({sentinel!r}).write_text("the custom code ran")
print("EVIL CODE RAN", file=sys.stderr)

from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''

def make_hostile(tokenizer_dir: Path, sentinel: Path, tokenizer_class: str = "EvilTokenizer") -> None:
    """Point ``tokenizer_dir``'s tokenizer_config.json at tokenizer_evil.py, written beside it, which writes
    ``sentinel`` when imported."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class=tokenizer_class, auto_map={"AutoTokenizer": [None, "tokenizer_evil.EvilTokenizer"]})
    config_path.write_text(json.dumps(config, indent=1))
    (tokenizer_dir / "tokenizer_evil.py").write_text(EVIL.format(sentinel=str(sentinel)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The paths the commands are given: a real cache (``cache``), its hostile copy (``hostile``), the demo
    teacher with the hostile tokenizer (``model``), the ``sentinel`` the code would write, inputs."""
    root = tmp_path_factory.mktemp("no-code-run")
    sentinel = root / "SENTINEL"
    build_cache(BuildOptions(teacher=str(TEACHER), out=str(root / "cache"), batch_size=8, progress=False,
                             targets=TargetSpec(kind="topk", k=8),
                             data=DataOptions(paths=(str(VALID),), seq_len=32, max_docs=1)))
    shutil.copytree(root / "cache", root / "hostile")
    make_hostile(root / "hostile" / "tokenizer", sentinel)
    shutil.copytree(TEACHER, root / "model")
    make_hostile(root / "model", sentinel)
    (root / "prompts.jsonl").write_text(json.dumps({"instruction": "Write a function that adds two numbers."}) + "\n")
    return {"root": root, "sentinel": sentinel, "cache": root / "cache", "hostile": root / "hostile",
            "model": root / "model", "tokenizer": root / "hostile" / "tokenizer", "prompts": root / "prompts.jsonl",
            "vllm": FIXTURES / "vllm_prompt_logprobs.jsonl", "api": FIXTURES / "openai_chat_logprobs.jsonl"}


def run_cli(world: dict[str, Path], args: list[str], stdin=subprocess.DEVNULL, out: Path | None = None):
    """``python -m teachercache ARGS`` (``{name}`` in an argument: that path of ``world``; ``{out}``: a fresh
    output path), offline, stdin closed (or ``stdin`` text), killed after TIMEOUT seconds."""
    out = out or world["root"] / "out"
    shutil.rmtree(out, ignore_errors=True)
    argv = [a.format(out=out, **world) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(world["root"] / "hf-modules"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    text = {"input": stdin} if isinstance(stdin, str) else {"stdin": stdin}
    try:
        return subprocess.run([sys.executable, "-m", "teachercache", *argv], capture_output=True, text=True,
                              env=env, cwd=world["root"], timeout=TIMEOUT, **text)
    except subprocess.TimeoutExpired:
        pytest.fail(f"teachercache {' '.join(argv)} ran past {TIMEOUT} s: waiting for input?")


# command -> (arguments, expected exit code, text its output must hold)
REFUSED = "custom"   # "tokenizer_config.json names custom tokenizer code (field auto_map: ...)"
COMMANDS = {
    "show": (["show", "{hostile}", "--row", "0"], 1, REFUSED),
    "inspect": (["inspect", "{hostile}", "--json"], 0, '"rows"'),
    "verify": (["verify", "{hostile}", "--deep"], 1, "FAULT"),   # the tokenizer files are a fault
    "diff": (["diff", "{cache}", "{hostile}"], 0, "KL"),
    "export-axolotl": (["export", "{hostile}", "--format", "axolotl", "--out", "{out}.parquet"], 0, "rows"),
    "export-hf": (["export", "{hostile}", "--format", "hf", "--out", "{out}"], 0, "rows"),
    "plot": (["plot", "{hostile}", "--out", "{out}"], 0, ".png"),
    "import-vllm": (["import-vllm", "{vllm}", "--tokenizer", "{tokenizer}", "--out", "{out}"], 1, REFUSED),
    "import-api": (["import-api", "{api}", "--tokenizer", "{tokenizer}", "--out", "{out}"], 1, REFUSED),
    "eval-cache": (["eval", "--model", str(TEACHER), "--data", "{hostile}", "--max-rows", "2"], 0, "perplexity"),
    "eval-model": (["eval", "--model", "{model}", "--data", "{cache}"], 1, "--trust-remote-code"),
    "build": (["build", "--teacher", "{model}", "--data", str(VALID), "--out", "{out}", "--max-docs", "1",
               "--seq-len", "32", "--no-progress"], 1, "--teacher"),
    "generate": (["generate", "--teacher", "{model}", "--prompts", "{prompts}", "--out", "{out}.jsonl",
                  "--no-progress"], 1, "--teacher"),
    "train-cache": (["train", "--cache", "{hostile}", "--student", "llama-tiny", "--out", "{out}", "--steps", "1",
                     "--no-progress"], 1, "tokenizer"),
    "train-student": (["train", "--cache", "{cache}", "--student", "{model}", "--out", "{out}", "--steps", "1",
                       "--no-progress"], 1, "--student"),
    "demo": (["demo", "--student", "{model}", "--out", "{out}", "--max-docs", "1", "--steps", "1",
              "--no-progress"], 1, "--student"),
}


@pytest.mark.parametrize("case", list(COMMANDS.values()), ids=list(COMMANDS))
def test_no_command_runs_the_code_or_asks_on_stdin(world, case):
    args, code, expected = case
    world["sentinel"].unlink(missing_ok=True)
    proc = run_cli(world, args)
    output = proc.stdout + proc.stderr
    assert not world["sentinel"].exists() and "EVIL CODE RAN" not in output, output[-2000:]
    assert PROMPT not in output and "[y/N]" not in output, output[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, output[-2000:]
    assert expected in output, output[-2000:]
    if code == 1:
        assert any(line.startswith(("Error: ", "FAULT ")) for line in proc.stderr.splitlines()), proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["show", "import-vllm", "eval-model"])
def test_answering_yes_on_stdin_runs_nothing(world, name):
    """What the prompt used to accept: a piped ``y`` is never read, and the code never runs."""
    args, code, expected = COMMANDS[name]
    world["sentinel"].unlink(missing_ok=True)
    proc = run_cli(world, args, stdin="y\ny\n")
    assert not world["sentinel"].exists() and PROMPT not in proc.stdout + proc.stderr
    assert proc.returncode == code and expected in proc.stdout + proc.stderr


def test_a_builtin_tokenizer_class_beside_an_auto_map_loads_without_the_code(world, tmp_path):
    """tokenizer_class names a class transformers ships: show uses it and never imports the auto_map's file."""
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    builtin = json.loads((world["cache"] / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"]
    make_hostile(cache / "tokenizer", world["sentinel"], tokenizer_class=builtin)
    world["sentinel"].unlink(missing_ok=True)
    proc = run_cli(world, ["show", str(cache), "--row", "0", "--positions", "0:3"])
    assert proc.returncode == 0 and "teacher's top stored ids" in proc.stdout, proc.stderr[-2000:]
    assert not world["sentinel"].exists()


def test_trust_remote_code_is_the_only_way_the_code_runs(world):
    """``eval --trust-remote-code`` on the hostile model (a user's model, the flag's purpose) imports
    tokenizer_evil.py; the same command without the flag refused it above."""
    world["sentinel"].unlink(missing_ok=True)
    proc = run_cli(world, ["eval", "--model", "{model}", "--data", "{cache}", "--max-rows", "2",
                           "--trust-remote-code"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert world["sentinel"].read_text() == "the custom code ran"
    world["sentinel"].unlink()


def test_train_trust_remote_code_is_for_the_student_not_the_cache(world):
    """``train --trust-remote-code`` with a preset student: the flag lets the student repository run code; the
    cache's tokenizer copy, which the preset takes, must still load without running any."""
    world["sentinel"].unlink(missing_ok=True)
    run_cli(world, ["train", "--cache", "{hostile}", "--student", "llama-tiny", "--out", "{out}", "--steps", "1",
                    "--no-progress", "--trust-remote-code"])
    assert not world["sentinel"].exists()
