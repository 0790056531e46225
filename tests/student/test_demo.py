"""The quick start's main job (`teachercache demo`) end to end at a reduced size: same code path."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from teachercache.cli import main
from teachercache.inspect.verify import verify_cache


def test_demo_writes_a_verified_cache_students_a_table_and_a_plot(tmp_path):
    out = tmp_path / "demo"
    config = tmp_path / "demo.yaml"
    config.write_text("steps: 6\nmax-docs: 2\neval_every: 100\n")   # --eval-every given below wins
    result = CliRunner().invoke(main, ["demo", "--config", str(config), "--out", str(out), "--eval-every", "3",
                                       "--eval-rows", "12", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert verify_cache(out / "cache") == []
    for name in ("student-kd", "student-ce"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        assert model.config.vocab_size == 8192
        records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 7))
        assert [r["step"] for r in records if "eval" in r] == [3, 6]
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"teacher", "student-kd", "student-ce"}
    # the teacher is far better than students trained for 6 steps; the table shows what results.json holds
    assert rows["teacher"]["perplexity"] < rows["student-kd"]["perplexity"]
    assert rows["student-kd"]["cache_bytes_per_token"] > 0
    # the whole job's wall time covers the build and both trainings (the table's parts), evaluation on top
    assert results["total_wall_seconds"] >= sum(r["wall_seconds"] for r in rows.values()) - 0.5
    assert f"the whole job: {results['total_wall_seconds'] / 60:.1f} minutes" in result.output
    table = (out / "results.md").read_text()
    assert f"{rows['teacher']['perplexity']:.2f}" in table and table in result.output + "\n"
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the options the job ran with, the file's and the flags', saved beside its output
    assert yaml.safe_load((out / "config.yaml").read_text()) == {
        "out": str(out), "steps": 6, "max_docs": 2, "sample_docs": True, "student": "llama-small", "eval_every": 3,
        "eval_rows": 12, "progress": False}


def test_the_demo_samples_its_documents_across_the_split(tmp_path):
    """sample_documents: n documents drawn without replacement (seeded), in the file's order, written beside
    the demo's output; the whole file when it has no more than n."""
    import numpy as np
    import pyarrow.parquet as pq

    from teachercache.student.demo import DATA, SAMPLE_NAME, sample_documents

    split = DATA / "corpus" / "train.parquet"
    texts = pq.read_table(split).column("text").to_pylist()
    path = sample_documents(str(split), 60, 0, tmp_path)
    got = pq.read_table(path).column("text").to_pylist()
    want = np.sort(np.random.default_rng(0).choice(len(texts), size=60, replace=False))
    assert path == str(tmp_path / SAMPLE_NAME) and got == [texts[i] for i in want]
    assert max(want) > 60 and len(set(got)) == 60                     # across the split, not its first 60
    (tmp_path / "again").mkdir()
    again = sample_documents(str(split), 60, 0, tmp_path / "again")                  # the same seed, the same draw
    assert pq.read_table(again).column("text").to_pylist() == got
    assert sample_documents(str(split), len(texts), 0, tmp_path) == str(split)
