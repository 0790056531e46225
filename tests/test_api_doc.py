"""docs/api.md runs as written: its ```python blocks, in order, in one namespace, in an empty directory."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"


def test_every_python_snippet_of_the_api_doc_runs_in_order(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 5    # build, read, train, evaluate, transformers.Trainer
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks, start=1):
        exec(compile(code, f"{DOC} (python block {i})", "exec"), namespace)

    # what the snippets made is what they claim: read back through files, not the snippets' own objects
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert namespace["built"].rows == namespace["rows"] > 1 and manifest["targets"]["k"] == 16
    summary = json.loads((tmp_path / "student" / "training_summary.json").read_text())
    assert summary["steps"] == 20 and summary["kd"]["ce_weight"] == 0.1
    assert summary["final_loss"] == namespace["result"].final_loss and summary["eval"] == namespace["result"].eval
    assert math.isfinite(namespace["on_cache"].kd_loss) and namespace["on_cache"].kd_loss > 0
    assert namespace["on_text"].kd_loss is None and namespace["on_text"].perplexity > 1
    assert namespace["trained"].global_step == 10
    weights = load_file(tmp_path / "hf-student" / "model.safetensors")
    assert weights.keys() == load_file(tmp_path / "student" / "model.safetensors").keys()


def test_the_readme_links_the_api_doc():
    assert "(docs/api.md)" in (ROOT / "README.md").read_text()
    assert "(api.md)" in (ROOT / "docs" / "README.md").read_text()
