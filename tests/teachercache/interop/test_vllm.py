"""`teachercache import-vllm`: vLLM prompt_logprobs (tests/fixtures/vllm_prompt_logprobs.jsonl, in
vLLM's serialised shape, made from the demo teacher with k=5: each element holds the 5 most likely ids
and the actual token, with logprob, rank and decoded_token) become a cache whose targets are the file's
values; the cache passes verify --deep and exports back to the same ids and probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from teachercache.cli import main
from teachercache.format.cache import Cache
from teachercache.inspect.rows import iter_cache_rows
from teachercache.inspect.verify import verify_cache
from teachercache.interop.vllm import VllmImportError, VllmImportOptions, import_vllm

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "vllm_prompt_logprobs.jsonl"
TOKENIZER = ROOT / "data" / "teacher"


def _expected(record, i, k=5):
    """The k best (id, logprob) of prompt_logprobs[i], best first, and the actual token's logprob."""
    entry = record["prompt_logprobs"][i]
    pairs = sorted(((int(t), v["logprob"]) for t, v in entry.items()), key=lambda p: (-p[1], p[0]))[:k]
    return [p[0] for p in pairs], np.array([p[1] for p in pairs]), entry[str(record["prompt_token_ids"][i])]["logprob"]


def test_import_then_export_round_trip(tmp_path):
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    result = CliRunner().invoke(main, ["import-vllm", str(FIXTURE), "--tokenizer", str(TOKENIZER),
                                       "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    cache = Cache.open(tmp_path / "c")
    m = cache.manifest
    assert m.targets.kind == "topk" and m.targets.k == 5 and m.totals.rows == len(records)
    assert m.data.packing == "document" and "estimated" in m.extra["entropy"]
    assert verify_cache(tmp_path / "c", deep=True) == []
    q = cache.layout.quantizer
    for record, row in zip(records, iter_cache_rows(cache)):
        ids = record["prompt_token_ids"]
        assert row.input_ids.tolist() == ids
        assert row.positions.tolist() == list(range(len(ids) - 1))
        for j in range(len(ids) - 1):
            want_ids, want_lps, want_label = _expected(record, j + 1)
            e = row.entries(j)
            got = dict(zip(row.ids[e].tolist(), row.logprobs[e].tolist()))  # quantised ties sort by id
            assert sorted(got) == sorted(want_ids)
            for t, lp in zip(want_ids, want_lps):
                assert abs(got[t] - lp) <= q.max_error(-lp) + 1e-6
            assert row.label_logprob[j] == pytest.approx(want_label, abs=0.5 / 1024 + 1e-6)
            assert row.rest_mass[j] == pytest.approx(1 - np.exp(want_lps).sum(), abs=1 / 65535 + 1e-6)

    export = CliRunner().invoke(main, ["export", str(tmp_path / "c"), "--out", str(tmp_path / "kd.parquet")])
    assert export.exit_code == 0, export.output
    table = pq.read_table(tmp_path / "kd.parquet")
    q = cache.layout.quantizer
    for r, record in enumerate(records):
        tids, tlps = table.column("target_token_ids")[r].as_py(), table.column("target_logprobs")[r].as_py()
        for t in range(len(record["prompt_token_ids"]) - 1):
            want_ids, want_lps, _ = _expected(record, t + 1)
            got = dict(zip(tids[t], tlps[t]))
            assert sorted(got) == sorted(want_ids)
            renorm = want_lps - np.logaddexp.reduce(want_lps)
            # each stored log-prob is within its half-step h of the file's, their log-sum-exp within max h
            slack = np.array([q.max_error(-x) for x in want_lps])
            assert (np.abs(np.array([got[i] for i in want_ids]) - renorm) <= slack + slack.max() + 1e-5).all()


def test_bad_input_is_refused_naming_the_line(tmp_path):
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    broken = json.loads(json.dumps(records[1]))
    del broken["prompt_logprobs"][2][str(broken["prompt_token_ids"][2])]
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(VllmImportError, match=r"bad.jsonl:2 prompt_logprobs\[2\]: the actual next token"):
        import_vllm(tmp_path / "bad.jsonl", TOKENIZER, tmp_path / "c")
    (tmp_path / "short.jsonl").write_text(json.dumps({"prompt_token_ids": [1, 2, 3], "prompt_logprobs": [None]}))
    with pytest.raises(VllmImportError, match="short.jsonl:1: prompt_logprobs has 1 elements for 3"):
        import_vllm(tmp_path / "short.jsonl", TOKENIZER, tmp_path / "d")
    import_vllm(FIXTURE, TOKENIZER, tmp_path / "e", VllmImportOptions(k=3))
    assert Cache.open(tmp_path / "e").manifest.targets.k == 3
    with pytest.raises(VllmImportError, match="--overwrite"):
        import_vllm(FIXTURE, TOKENIZER, tmp_path / "e")
