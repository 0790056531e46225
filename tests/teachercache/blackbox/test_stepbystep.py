"""`teachercache stepbystep`: two task records per chain of thought, exactly as documented."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from teachercache.blackbox.stepbystep import StepByStepError, step_by_step, task_records
from teachercache.cli import main

COT = {"id": 4, "template": "cot", "query": "Ann has 4 pens and loses 1. How many?", "shots": [2],
       "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "4 - 1 = 3.\nAnswer: 3"}],
       "rationale": "4 - 1 = 3.", "answer": "3"}


def test_task_records_golden():
    assert task_records(COT) == [
        {"id": "4/label", "task": "label",
         "messages": [{"role": "user", "content": "[label] Ann has 4 pens and loses 1. How many?"},
                      {"role": "assistant", "content": "3"}]},
        {"id": "4/rationale", "task": "rationale",
         "messages": [{"role": "user", "content": "[rationale] Ann has 4 pens and loses 1. How many?"},
                      {"role": "assistant", "content": "4 - 1 = 3."}]}]
    weighted = task_records(COT, label_repeat=1, rationale_repeat=3)
    assert [r["task"] for r in weighted] == ["label", "rationale", "rationale", "rationale"]


def test_file_and_cli(tmp_path):
    src, dst = tmp_path / "cot.jsonl", tmp_path / "tasks.jsonl"
    no_answer = dict(COT, id=5, answer=None)
    src.write_text(json.dumps(COT) + "\n" + json.dumps(no_answer) + "\n")
    result = CliRunner().invoke(main, ["stepbystep", str(src), str(dst), "--rationale-repeat", "2"])
    assert result.exit_code == 0, result.output
    assert "2 records read, 3 task records written; skipped: 1 no answer" in result.output
    assert [json.loads(x)["id"] for x in dst.read_text().splitlines()] == ["4/label", "4/rationale", "4/rationale"]
    src.write_text(json.dumps({"id": 1, "template": "icl", "query": "q"}) + "\n")
    with pytest.raises(StepByStepError, match="cot.jsonl:1: not a record of teachercache generate --template cot"):
        step_by_step(src, dst)
