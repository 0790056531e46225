"""End to end on the demo teacher (with a chat template): generate with each template, build a cache from
the answers, train a student a few steps (CE only, and CE + KD); prompts, chat rows and masks checked exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from chat_teacher import make_chat_teacher

from teachercache.blackbox.generate import GenerateOptions, generate
from teachercache.blackbox.stepbystep import step_by_step
from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

PROMPTS = [{"id": "a", "instruction": "def add(a, b):"}, {"id": "b", "instruction": "import os", "input": "x = 1"},
           {"id": "c", "instruction": "class Foo:"}]
POOL = [{"id": "d1", "instruction": "def one():", "rationale": "it returns", "output": "return 1"}]
GOLDEN = {  # the user message of each prompt under each template (one demonstration: the whole pool)
    "instruction": {"a": "### Instruction:\ndef add(a, b):\n\n### Response:\n",
                    "b": "### Instruction:\nimport os\n\n### Input:\nx = 1\n\n### Response:\n",
                    "c": "### Instruction:\nclass Foo:\n\n### Response:\n"},
    "icl": {"a": "Input: def one():\nOutput: return 1\n\nInput: def add(a, b):\nOutput:",
            "b": "Input: def one():\nOutput: return 1\n\nInput: import os\nx = 1\nOutput:",
            "c": "Input: def one():\nOutput: return 1\n\nInput: class Foo:\nOutput:"},
    "cot": {"a": "Question: def one():\nReasoning: it returns\nAnswer: return 1\n\nQuestion: def add(a, b):\nReasoning:",
            "b": "Question: def one():\nReasoning: it returns\nAnswer: return 1\n\nQuestion: import os\nx = 1\nReasoning:",
            "c": "Question: def one():\nReasoning: it returns\nAnswer: return 1\n\nQuestion: class Foo:\nReasoning:"},
}


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    root = tmp_path_factory.mktemp("blackbox")
    teacher = make_chat_teacher(root / "teacher")
    prompts, pool = root / "prompts.jsonl", root / "pool.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    pool.write_text("".join(json.dumps(p) + "\n" for p in POOL))
    outs = {}
    for template in ("instruction", "icl", "cot"):
        outs[template] = root / f"{template}.jsonl"
        s = generate(GenerateOptions(teacher=str(teacher), prompts=str(prompts), out=str(outs[template]),
                                     template=template, pool=None if template == "instruction" else str(pool),
                                     shots=1, max_new_tokens=8, temperature=0.8, seed=1, batch_size=2,
                                     progress=False))
        assert s.answered + sum(s.failed.values()) == 3 and s.failed.get("invalid record", 0) == 0
    return root, teacher, outs


def test_prompts_rendered_exactly(answers):
    _, _, outs = answers
    for template, path in outs.items():
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        assert recs, template
        for r in recs:
            assert r["messages"][0] == {"role": "user", "content": GOLDEN[template][r["id"]]}
            assert r["template"] == template
            if template != "instruction":
                assert r["shots"] == ["d1"]
            if template == "cot":
                text = r["messages"][1]["content"]
                assert (r["answer"] is None) == ("Answer:" not in text)
                assert r["rationale"] == text.partition("Answer:")[0].strip()


def test_build_masks_answers_only_and_train(answers):
    import torch
    from transformers import AutoTokenizer

    from teachercache.student.collate import IGNORE_INDEX, collate_rows
    from teachercache.student.dataset import CacheDataset
    from teachercache.student.options import KDOptions, ScheduleOptions, TrainOptions
    from teachercache.student.train import train

    root, teacher, outs = answers
    cache_dir = root / "cache"
    build_cache(BuildOptions(teacher=str(teacher), out=str(cache_dir), batch_size=4, progress=False,
                             targets=TargetSpec(kind="topk", k=8),
                             data=DataOptions(paths=tuple(str(outs[t]) for t in ("cot", "icl", "instruction")),
                                              seq_len=64, packing="document")))
    tok = AutoTokenizer.from_pretrained(teacher)
    docs = [json.loads(x) for t in ("cot", "icl", "instruction") for x in outs[t].read_text().splitlines()]
    # rows in document order; a document longer than seq_len continues on the next row
    rows = [r for r in CacheDataset(cache_dir, shuffle=False, rank=0, world_size=1)]
    i = 0
    for doc in docs:
        user, answer = doc["messages"][0]["content"], doc["messages"][1]["content"]
        golden = f"<|user|>\n{user}<|endoftext|>\n<|assistant|>\n{answer}<|endoftext|>\n"
        ids, mask, row_ends = [], [], []
        while len(tok.decode(ids)) < len(golden):
            ids += rows[i]["input_ids"].tolist()
            mask += rows[i]["target_mask"].tolist()
            row_ends.append(len(ids) - 1)
            i += 1
        assert tok.decode(ids) == golden                       # the chat row(s), exactly
        header = f"<|user|>\n{user}<|endoftext|>\n<|assistant|>\n"
        start = next(j for j in range(len(ids)) if tok.decode(ids[:j]) == header)   # first assistant token
        assert tok.decode(ids[start:]) == f"{answer}<|endoftext|>\n"
        # a target exactly where the next token is the assistant's, except at a row's last position
        assert mask == [t + 1 >= start and t not in row_ends for t in range(len(ids))]
    assert i == len(rows)
    batch = collate_rows(rows)
    used = batch.labels[batch.labels != IGNORE_INDEX]           # the tokens the student's loss sees
    assert tok.decode(used.tolist()) == "".join(tok.decode([t for t in r["input_ids"][1:][r["target_mask"][:-1]]])
                                                for r in rows)
    assert int(np.sum([r["target_mask"].sum() for r in rows])) == len(used)
    torch.manual_seed(0)
    schedule = ScheduleOptions(steps=2, batch_size=4, warmup_steps=1)
    ce_only = train(TrainOptions(cache=str(cache_dir), student="llama-tiny", out=str(root / "ce"), schedule=schedule,
                                 kd=KDOptions(kd_weight=0.0, ce_weight=1.0), progress=False, log_every=1, device="cpu"))
    both = train(TrainOptions(cache=str(cache_dir), student="llama-tiny", out=str(root / "kd"), schedule=schedule,
                              kd=KDOptions(kd_weight=1.0, ce_weight=0.5), progress=False, log_every=1, device="cpu"))
    for result in (ce_only, both):
        assert result.steps == 2 and np.isfinite(result.final_loss)
        assert (result.out / "config.json").exists()
    metrics = [json.loads(x) for x in (root / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kd"] > 0


def test_step_by_step_tasks_build(answers, tmp_path):
    root, teacher, outs = answers
    cot = [json.loads(x) for x in outs["cot"].read_text().splitlines()]
    for r in cot:   # the demo teacher (a code model, 8 tokens) never writes the marker: give it one
        r["answer"], r["rationale"] = "42", r["messages"][1]["content"]
    src = tmp_path / "cot.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in cot))
    summary = step_by_step(src, tmp_path / "tasks.jsonl", rationale_repeat=2)
    assert summary.written == 3 * len(cot)
    manifest = build_cache(BuildOptions(teacher=str(teacher), out=str(tmp_path / "cache"), progress=False,
                                        targets=TargetSpec(kind="topk", k=4),
                                        data=DataOptions(paths=(str(tmp_path / "tasks.jsonl"),), seq_len=64,
                                                         packing="document")))
    assert manifest.rows >= 3 * len(cot)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher)
    first = next(iter(Cache.open(tmp_path / "cache").iter_batches()))
    text = tok.decode(first.input_ids[first.row_offsets[0]:first.row_offsets[1]].tolist())
    assert text.startswith(f"<|user|>\n[label] {cot[0]['query']}<|endoftext|>\n<|assistant|>\n42<|endoftext|>")
