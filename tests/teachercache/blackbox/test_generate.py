"""`teachercache generate` on the real demo teacher: batching does not change answers, a SIGKILLed run
resumes with every prompt answered exactly once, every prompt is accounted for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from teachercache.blackbox.generate import GenerateError, GenerateOptions, generate
from teachercache.cli import main
from teachercache.errors import TeachercacheError

ROOT = Path(__file__).resolve().parents[3]
DEMO_TEACHER = str(ROOT / "data" / "teacher")
CODE = ["def add(a, b):", "import os", "class Foo:", "for i in range(10):", "with open(path) as f:",
        "try:", "return None", "if __name__ == '__main__':"]


def write_prompts(path: Path, n: int, extra_lines=()) -> Path:
    lines = [json.dumps({"instruction": CODE[i % len(CODE)], "input": f"# case {i}" if i % 3 else ""})
             for i in range(n)]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_answers_do_not_depend_on_batching(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"out{bs}.jsonl"
        s = generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out=str(out), max_new_tokens=8,
                                     temperature=1.0, top_p=0.9, seed=7, batch_size=bs, progress=False))
        assert (s.answered, s.skipped_done, sum(s.failed.values())) == (5, 0, 0)
        outs.append(records(out))
    assert outs[0] == outs[1]
    assert [r["id"] for r in outs[0]] == [1, 2, 3, 4, 5]
    r = outs[0][1]
    assert r["messages"][0] == {"role": "user", "content": "### Instruction:\nimport os\n\n### Input:\n# case 1\n\n"
                                                           "### Response:\n"}
    assert r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"] == r["messages"][1]["content"].strip()
    assert r["query"] == "import os\n# case 1"
    other = tmp_path / "seed8.jsonl"
    generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out=str(other), max_new_tokens=8,
                             temperature=1.0, top_p=0.9, seed=8, batch_size=5, progress=False))
    assert records(other) != outs[0]   # the seed matters


def test_sigkill_then_resume_answers_every_prompt_once(tmp_path):
    n = 60
    prompts = write_prompts(tmp_path / "p.jsonl", n)
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "teachercache", "generate", "--teacher", DEMO_TEACHER,
                             "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8",
                             "--batch-size", "1", "--temperature", "1.0", "--seed", "3", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = records(out)
    assert 3 <= len(before) < n
    with open(out, "ab") as f:                          # what a kill in the middle of a write leaves
        f.write(b'{"id": 999, "template": "instr')
    s = generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out=str(out), max_new_tokens=8,
                                 temperature=1.0, seed=3, batch_size=8, progress=False))
    assert s.rewritten_partial_line
    assert (s.total, s.skipped_done, s.answered, sum(s.failed.values())) == (n, len(before), n - len(before), 0)
    after = records(out)
    assert sorted(r["id"] for r in after) == list(range(1, n + 1))   # every id exactly once
    assert after[:len(before)] == before
    reference = tmp_path / "ref.jsonl"                   # an uninterrupted run writes the same answers
    generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out=str(reference), max_new_tokens=8,
                             temperature=1.0, seed=3, batch_size=16, progress=False))
    assert sorted(after, key=lambda r: r["id"]) == records(reference)
    again = generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out=str(out), max_new_tokens=8,
                                     temperature=1.0, seed=3, progress=False))
    assert (again.answered, again.skipped_done) == (0, n)


def test_every_prompt_is_accounted_for(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2, extra_lines=[
        "not json", json.dumps({"input": "no instruction"}), json.dumps({"id": "long", "instruction": "x " * 600}),
        json.dumps({"id": "ok", "instruction": "def f():"})])
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"instruction": "def f():", "output": "pass"}) + "\n"
                    + json.dumps({"instruction": "import re", "output": "import sys"}) + "\n")
    out = tmp_path / "out.jsonl"
    s = generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out=str(out), template="icl",
                                 pool=str(pool), shots=2, max_new_tokens=8, temperature=0, progress=False))
    # prompts 1, 2 and "long" can draw 2 demonstrations; "ok" is pool record 1's text: only 1 left
    assert s.total == 6
    assert dict(s.failed) == {"invalid record": 2, "prompt too long": 1, "pool too small": 1}
    assert s.failed_ids == {"invalid record": [3, 4], "prompt too long": ["long"], "pool too small": ["ok"]}
    assert s.answered + sum(s.failed.values()) == s.total
    recs = records(out)
    assert [r["id"] for r in recs] == [1, 2]
    first = recs[0]
    assert first["template"] == "icl" and sorted(first["shots"]) == [1, 2]
    assert first["messages"][0]["content"].endswith("\n\nInput: def add(a, b):\nOutput:")
    assert "failed (pool too small): 1, ids ['ok']" in "\n".join(s.lines())


def test_refusals(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    with pytest.raises(GenerateError, match="--pool"):
        GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out="o", template="icl")
    with pytest.raises(GenerateError, match="--template icl or cot"):
        GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out="o", pool="x.jsonl")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "instruction": "a"}\n{"id": 1, "instruction": "b"}\n')
    with pytest.raises(GenerateError, match="appears twice"):
        generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(dup), out=str(tmp_path / "o.jsonl")))
    bad_out = tmp_path / "bad.jsonl"
    bad_out.write_text("hello\n")
    with pytest.raises(TeachercacheError, match="bad.jsonl:1"):
        generate(GenerateOptions(teacher=DEMO_TEACHER, prompts=str(prompts), out=str(bad_out)))
    result = CliRunner().invoke(main, ["generate", "--teacher", DEMO_TEACHER, "--prompts", str(prompts), "--out",
                                       str(tmp_path / "o.jsonl"), "--template", "icl"])
    assert result.exit_code == 1 and "needs --pool" in result.output


def test_cli_generate_cot_zero_shot(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["generate", "--teacher", DEMO_TEACHER, "--prompts", str(prompts), "--out",
                                       str(out), "--template", "cot", "--shots", "0", "--max-new-tokens", "6",
                                       "--temperature", "0", "--stop", "\n\n", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2 prompts: 2 answered, 0 already done, 0 failed" in result.output
    for r in records(out):
        assert r["messages"][0]["content"].startswith("Question: ") and r["messages"][0]["content"].endswith("\nReasoning:")
        assert "\n\n" not in r["messages"][1]["content"]
        assert r["shots"] == [] and "rationale" in r and "answer" in r
