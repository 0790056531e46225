"""`teachercache import-api`: fixtures in the documented OpenAI shape (tools/make_api_fixtures.py) round-trip
through a cache; unmappable tokens are counted, reported and refused above the threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from chat_teacher import make_chat_teacher
from click.testing import CliRunner

from teachercache.cli import main
from teachercache.format.cache import Cache
from teachercache.inspect.verify import verify_cache
from teachercache.interop.openai_chat import ApiImportOptions, ImportApiError, TokenMap, import_api

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GOOD = FIXTURES / "openai_chat_logprobs.jsonl"
FOREIGN = FIXTURES / "openai_chat_logprobs_unmapped.jsonl"
TOL = 0.02   # nats: the codec's stored-log-prob fidelity (DESIGN.md §5)


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    return make_chat_teacher(tmp_path_factory.mktemp("chat") / "teacher")


def rows_of(cache_dir):
    cache = Cache.open(cache_dir)
    out = []
    for b in cache.iter_batches():
        pos = 0
        for r in range(b.num_rows):
            a, z = b.row_offsets[r], b.row_offsets[r + 1]
            mask = b.target_mask[a:z]
            n = int(mask.sum())
            out.append({"ids": b.input_ids[a:z].tolist(), "mask": mask.tolist(),
                        "targets": [(b.target_ids[b.target_offsets[p]:b.target_offsets[p + 1]].tolist(),
                                     b.target_logprobs[b.target_offsets[p]:b.target_offsets[p + 1]].tolist())
                                    for p in range(pos, pos + n)],
                        "label": b.label_logprob[pos:pos + n].tolist(), "rest": b.rest_mass[pos:pos + n].tolist()})
            pos += n
    return out


def test_round_trip(chat_teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_teacher)
    manifest, report = import_api(GOOD, chat_teacher, tmp_path / "cache")
    assert (report.records, report.rows, report.unmapped) == (3, 3, 0)
    assert verify_cache(tmp_path / "cache", deep=True) == []
    assert manifest.targets.k == 5 and manifest.data.packing == "document"
    fixture = [json.loads(line) for line in GOOD.read_text().splitlines()]
    vocab = tok.get_vocab()
    for rec, row in zip(fixture, rows_of(tmp_path / "cache")):
        content = rec["response"]["choices"][0]["logprobs"]["content"]
        prompt = tok.apply_chat_template(rec["messages"], tokenize=True, add_generation_prompt=True, return_dict=False)
        answer = tok(rec["response"]["choices"][0]["message"]["content"], add_special_tokens=False)["input_ids"]
        assert row["ids"] == list(prompt) + answer                     # prompt tokens in the row, then the answer
        assert row["mask"] == [False] * (len(prompt) - 1) + [True] * len(answer) + [False]
        assert tok.decode(row["ids"][len(prompt):]) == rec["response"]["choices"][0]["message"]["content"]
        for entry, (ids, lps), label, rest in zip(content, row["targets"], row["label"], row["rest"]):
            want = sorted(((vocab["".join(_b2u(bytes(t["bytes"])) if t["bytes"] is not None else
                                          _b2u(t["token"].encode()))], t["logprob"]) for t in entry["top_logprobs"]),
                          key=lambda p: (-p[1], p[0]))
            assert ids == [w[0] for w in want]
            np.testing.assert_allclose(lps, [w[1] for w in want], atol=TOL)
            assert abs(label - entry["logprob"]) < TOL
            assert abs(rest - (1 - sum(np.exp(w[1]) for w in want))) < 1e-3
    lone = rows_of(tmp_path / "cache")[0]["targets"][0][0]
    assert vocab["â"] in lone                                      # "bytes:\xe2" mapped through its bytes


def _b2u(data: bytes) -> str:
    from teachercache.interop.openai_chat import bytes_to_unicode
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def test_token_map_byte_level(chat_teacher):
    from transformers import AutoTokenizer

    tmap = TokenMap(AutoTokenizer.from_pretrained(chat_teacher))
    assert tmap.byte_level
    vocab = tmap.vocab
    assert tmap(" def", None) == vocab["Ġdef"] == tmap("ignored", [32, 100, 101, 102])
    assert tmap("\n", None) == vocab["Ċ"]
    assert tmap("é", None) is None            # two bytes C3 A9; this vocabulary has no such token
    assert tmap("bytes:\\xc3", [0xC3]) == vocab["Ã"]


def test_unmapped_tokens_refused_then_reported(chat_teacher, tmp_path):
    with pytest.raises(ImportApiError) as e:
        import_api(FOREIGN, chat_teacher, tmp_path / "refused")
    msg = str(e.value)
    assert "15 of 103 token occurrences (14.56%)" in msg and "'你好' x8" in msg and "'😀' x4" in msg
    assert "--max-unmapped" in msg and not (tmp_path / "refused").exists()
    manifest, report = import_api(FOREIGN, chat_teacher, tmp_path / "cache", ApiImportOptions(max_unmapped=0.2))
    assert (report.tokens, report.unmapped) == (103, 15)
    assert report.unmapped_tokens == {"你好": 8, "😀": 4, "é": 3}
    assert report.skipped_records == 2 and report.rows == 1      # two answers hold the unmappable emoji
    assert manifest.extra["unmapped_tokens"] == 15 and manifest.data.documents_skipped == {"unmapped token": 2}
    row = rows_of(tmp_path / "cache")[0]
    assert all(len(ids) <= 5 for ids, _ in row["targets"])        # unmapped alternatives left out
    assert verify_cache(tmp_path / "cache", deep=True) == []


def test_cli_import_api(chat_teacher, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["import-api", str(FOREIGN), "--tokenizer", str(chat_teacher), "--out",
                                  str(tmp_path / "a")])
    assert result.exit_code == 1 and "are not in the vocabulary" in result.output
    result = runner.invoke(main, ["import-api", str(GOOD), "--tokenizer", str(chat_teacher), "--out",
                                  str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "3 records -> 3 rows" in result.output and "0 of 98 token occurrences" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}], "response": {"choices": [{}]}}) + "\n")
    with pytest.raises(ImportApiError, match=r"bad.jsonl:1: field response.choices\[0\].logprobs.content missing"):
        import_api(bad, chat_teacher, tmp_path / "c")
