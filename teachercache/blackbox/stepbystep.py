"""`teachercache stepbystep`: "distilling step-by-step" (Hsieh et al., 2023) data from `generate --template cot`.

Each chain-of-thought record becomes two chat records on the bare query: a ``[label] `` task (answer)
and a ``[rationale] `` task (rationale). The paper's L_label + λ·L_rationale becomes whole-number
repetitions (``label_repeat``, ``rationale_repeat``), since the cache has no per-row weight. Records
without an answer or rationale are skipped and counted. docs/blackbox.md has the record shapes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from teachercache.errors import TeachercacheError

LABEL_PREFIX = "[label] "
RATIONALE_PREFIX = "[rationale] "


class StepByStepError(TeachercacheError):
    """An input that is not `generate --template cot` output, or bad options."""


@dataclass
class StepByStepSummary:
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)


def task_records(rec: dict, label_repeat: int = 1, rationale_repeat: int = 1) -> list[dict]:
    """The records of one cot record (see the module docstring); [] when it has no answer or rationale."""
    if not rec.get("answer") or not rec.get("rationale"):
        return []
    out = []
    for task, prefix, text, times in (("label", LABEL_PREFIX, rec["answer"], label_repeat),
                                      ("rationale", RATIONALE_PREFIX, rec["rationale"], rationale_repeat)):
        one = {"id": f"{rec['id']}/{task}", "task": task,
               "messages": [{"role": "user", "content": prefix + rec["query"]},
                            {"role": "assistant", "content": text}]}
        out += [one] * times
    return out


def step_by_step(src: str | os.PathLike, dst: str | os.PathLike, label_repeat: int = 1,
                 rationale_repeat: int = 1) -> StepByStepSummary:
    """Write the two-task records of every cot record of ``src`` to ``dst`` (replaced)."""
    src, dst = Path(src), Path(dst)
    if label_repeat < 0 or rationale_repeat < 0 or label_repeat + rationale_repeat == 0:
        raise StepByStepError("--label-repeat and --rationale-repeat: whole numbers >= 0, not both 0")
    if not src.is_file():
        raise StepByStepError(f"{src}: no such file (give the output of teachercache generate --template cot)")
    summary = StepByStepSummary()
    tmp = dst.with_name(dst.name + ".partial")
    with open(src, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as g:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise StepByStepError(f"{src}:{line_no}: not valid JSON") from None
            if not isinstance(rec, dict) or rec.get("template") != "cot" or "query" not in rec:
                raise StepByStepError(f"{src}:{line_no}: not a record of teachercache generate --template cot "
                                      "(fields template, query, rationale, answer)")
            summary.read += 1
            records = task_records(rec, label_repeat, rationale_repeat)
            if not records:
                summary.skipped["no answer" if not rec.get("answer") else "no rationale"] += 1
            for r in records:
                g.write(json.dumps(r, ensure_ascii=False) + "\n")
            summary.written += len(records)
    os.replace(tmp, dst)
    return summary
