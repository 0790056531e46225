"""tools/gpu_check.py, the GPU check of issue 20, run end to end on CPU with tiny sizes (--device cpu --small):
it ends with one JSON line holding every part's figures, and every correctness check passes (the "device"
path, here torch on CPU, against the numba kernels and dense float64). Its timings are not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"targets_topk", "targets_nucleus", "targets_sample_same_uniforms", "targets_sample_seeded", "losses",
          "fused_head"}
LOSS_CASES = {"forward_kl/rest", "forward_kl/renormalize T=2", "reverse_kl/rest", "sampled_ce"}


def passes(node, where: str = "correctness"):
    """(where, value) of every "pass" flag in a nested report."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pass":
                yield where, value
            else:
                yield from passes(value, f"{where}.{key}")


def test_the_gpu_check_runs_on_cpu_and_every_correctness_check_passes():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--small"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]          # exactly one line: the JSON
    report = json.loads(lines[0])

    assert {"device", "torch", "transformers", "sizes", "correctness", "build", "train", "summary", "all_correct",
            "total_s"} <= set(report)
    assert report["device"] == "cpu" and report["small"] is True and "aborted" not in report
    correctness = report["correctness"]
    assert CHECKS | {"pass", "seconds"} == set(correctness)
    assert set(correctness["losses"]) == LOSS_CASES | {"pass"}
    failed = [where for where, ok in passes(correctness) if ok is not True]
    assert failed == [], failed
    assert report["all_correct"] is True and all(report["summary"][name] for name in CHECKS)

    # on CPU both "devices" draw the same stream: the same uniforms give the same draws, the seeded streams agree
    assert correctness["targets_sample_same_uniforms"]["draws_equal"] == 1.0
    assert correctness["targets_sample_seeded"]["support_overlap"] == 1.0
    top = correctness["targets_topk"]
    assert top["device_torch"]["wrong_id_sets"] == top["cpu_numba"]["wrong_id_sets"] == 0
    assert top["device_vs_cpu"]["max_code_diff"] <= 1
    assert correctness["fused_head"]["fused_vs_float64"]["loss_rel_err"] < 1e-5

    sizes, build, train = report["sizes"], report["build"], report["train"]
    assert build["tokens"] == sizes["build_rows"] * sizes["seq_len"]
    assert build["forward_s"] > 0 and build["build_s"] > 0 and build["bytes_per_token"] > 0
    assert build["build_over_forward"] == pytest.approx(build["build_s"] / build["forward_s"], rel=1e-2)
    assert isinstance(build["target_met"], bool) and build["target"] == 1.05
    for mode in ("ce", "kd", "kd_fused"):
        assert train[mode]["step_s"] > 0 and train[mode]["extra_peak_mb"] is None    # no GPU memory on CPU
    assert train["kd_over_ce"] == pytest.approx(train["kd"]["step_s"] / train["ce"]["step_s"], rel=1e-2)
    assert isinstance(train["target_met"], bool) and train["target"] == 1.10
