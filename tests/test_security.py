"""Opening a cache must never run code: no pickle, no torch.load, trust_remote_code never turned on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"\bimport pickle\b|\bpickle\.|\btorch\.load\(|\bnp\.load\(.*allow_pickle=True"
                       r"|trust_remote_code\s*=\s*True|\bimport dill\b|\bimport joblib\b")


def test_no_code_executing_loaders_in_the_packages():
    hits = []
    for package in ("teachercache", "student", "tools"):
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


def test_the_scan_would_catch_them():
    assert FORBIDDEN.search("import pickle") and FORBIDDEN.search("x = torch.load(f)")
    assert FORBIDDEN.search("AutoModel.from_pretrained(p, trust_remote_code=True)")
