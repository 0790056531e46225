"""tools/faults.py --quick end to end: real `teachercache build`/`train` subprocesses killed with SIGKILL
and resumed, corrupted shards and manifests read in worker processes, a build into a full tmpfs, and
builds started beside a running one. The full campaign's figures are in RELIABILITY.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_fault_campaign_finds_nothing():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "faults.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    build, train, fuzz = report["build"], report["train"], report["fuzz"]
    assert build["kills"] == 2 and build["identical"] == 2 and build["failures"] == [], build
    assert train["kills"] == 1 and train["identical"] == 1 and train["max_abs_diff"] <= 1e-6, train
    assert fuzz["cases"] == 60 and fuzz["failure_count"] == 0, fuzz["failures"]
    for path, outcomes in fuzz["outcomes"].items():
        assert not {"crash", "hang", "unnamed", "missed"} & set(outcomes), (path, outcomes)
    assert "silent" not in fuzz["outcomes"]["reader"]
    assert sum(fuzz["outcomes"]["reader"].values()) == 60
    disk = report["disk"]
    if "skipped" not in disk:  # needs root for the tmpfs mount
        assert disk["all_clear"] and disk["all_resumed"], disk
        assert "the disk is full" in disk["rounds"][0]["message"]
    assert report["lock"]["all_ok"], report["lock"]
    assert "another build is writing into this cache" in report["lock"]["rounds"][0]["message"]
    hostile = report["hostile"]   # issue 18's inputs: the first case of each item
    assert hostile["cases"] >= 7 and hostile["ok"] == hostile["cases"], [r for r in hostile["results"] if not r["ok"]]
