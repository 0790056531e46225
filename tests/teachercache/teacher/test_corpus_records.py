"""Issue 18 on the corpus side, with real files: every bad record is skipped, counted and reported with its file,
line and reason (--max-bad-records stops the pass past a limit); compressed inputs are read; files a data
directory holds but the pass does not read are listed, never dropped without a word."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from transformers import AutoTokenizer

from teachercache.errors import OptionError
from teachercache.teacher.corpus import (BadRecord, DataError, DataOptions, DocumentCounts, TooManyBadRecords,
                                         bad_record_limit, count_documents, iter_documents, iter_packed_rows,
                                         scan_inputs)

TEACHER = Path(__file__).resolve().parents[3] / "data" / "teacher"
GOOD = [{"text": "def f(x):\n    return x + 1\n"}, {"text": "emoji \U0001f600 as an escaped pair is fine"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
BAD = [  # (raw line, coarse reason counted in the manifest, words of the reported reason)
    (b'{"text": "lone \\ud83d surrogate"}', "undecodable", "lone surrogate (\\ud83d) in field 'text'"),
    (b"[" * 100_000 + b"]" * 100_000, "undecodable", "nested too deeply"),
    (b'{"text": "\xff\xfe"}', "undecodable", "not UTF-8 (byte 0xff at column 11)"),
    (b"{not json", "undecodable", "not JSON (Expecting property name"),
    (b'["a", "list"]', "undecodable", "not a JSON object but an array"),
    (b'{"body": "x"}', "missing field", "no field 'text' (or 'messages')"),
    (b'{"text": null}', "missing field", "field 'text' is null"),
    (b'{"text": 5}', "undecodable", "field 'text' is a number, not a string"),
    (b'{"messages": [{"content": "no role"}]}', "undecodable", "field 'messages' is not a list of"),
    (b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "undecodable", "lone surrogate (\\udc00)"),
    (b'{"messages": [{"role": "user", "content": "x", "meta": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}]}",
     "undecodable", "nested more than 32 levels deep"),
]


def _lines(records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def _read(options: DataOptions) -> tuple[list, DocumentCounts, list[BadRecord]]:
    reported: list[BadRecord] = []
    counts = DocumentCounts(on_bad=reported.append)
    return list(iter_documents(options, counts)), counts, reported


def test_every_bad_record_is_skipped_counted_and_reported_with_file_line_and_reason(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + _lines([GOOD[0], *(raw for raw, _, _ in BAD), b"", *GOOD[1:]]))  # a BOM first
    docs, counts, reported = _read(DataOptions(paths=(str(f),), max_bad_records="100%"))
    assert [d.text or d.messages for d in docs] == [GOOD[0]["text"], GOOD[1]["text"], GOOD[2]["messages"]]
    assert counts.read == 3 + len(BAD) and counts.bad == len(BAD)
    assert dict(counts.skipped) == {"undecodable": 9, "missing field": 2}
    assert [(r.file, r.line) for r in reported] == [(str(f), 2 + i) for i in range(len(BAD))]
    for record, (_, _, words) in zip(reported, BAD):
        assert words in record.reason, (record, words)
    assert str(reported[0]) == f"{f}:2: a lone surrogate (\\ud83d) in field 'text': not valid Unicode"
    # what is left tokenizes: no bad record reaches the tokenizer (it raised TypeError on a lone surrogate)
    tok = AutoTokenizer.from_pretrained(TEACHER)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows = list(iter_packed_rows(DataOptions(paths=(str(f),), seq_len=16, max_bad_records="100%"), tok,
                                 DocumentCounts()))
    assert sum(len(r.input_ids) for r in rows) > 0


def test_table_and_text_records_report_row_numbers(tmp_path):
    pq.write_table(pa.table({"text": ["a = 1", None, "b = 2"]}), tmp_path / "t.parquet")
    (tmp_path / "bad.txt").write_bytes(b"ok \xc3\x28 not utf-8")
    _, counts, reported = _read(DataOptions(paths=(str(tmp_path / "t.parquet"), str(tmp_path / "bad.txt"))))
    assert [str(r) for r in reported] == [f"{tmp_path / 't.parquet'}:2: field 'text' is null",
                                          f"{tmp_path / 'bad.txt'}: not UTF-8 (byte 0xc3 at offset 3)"]
    assert counts.read == 4 and dict(counts.skipped) == {"missing field": 1, "undecodable": 1}


def test_max_bad_records_stops_the_pass_past_its_limit(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(_lines([GOOD[0], b"{x", GOOD[0], b"{y", b"{z"] + [GOOD[0]] * 20 + [b"{w"] * 12))
    with pytest.raises(TooManyBadRecords, match=r"too many bad records: 1 of the 2 documents read so far, more "
                                                 r"than --max-bad-records 0 allows; the first: .*a.jsonl:2: not JSON"):
        _read(DataOptions(paths=(str(f),), max_bad_records="0"))
    with pytest.raises(TooManyBadRecords, match="3 of the 5 documents"):
        _read(DataOptions(paths=(str(f),), max_bad_records=2))
    _, counts, _ = _read(DataOptions(paths=(str(f),), max_bad_records=15))
    assert counts.bad == 15 and counts.read == 37
    with pytest.raises(TooManyBadRecords, match="11 of the 33 documents read so far, more than --max-bad-records 1%"):
        _read(DataOptions(paths=(str(f),)))  # the default: 1% of the documents read, at least 10
    _, counts, _ = _read(DataOptions(paths=(str(f),), max_bad_records="50%"))
    assert counts.bad == 15
    assert bad_record_limit("1%")(100_000) == 1000 and bad_record_limit("1%")(5) == 10
    for wrong in ("x", "-1", "1.5", "nan%", "inf%", "101%", "-1%", True, 2.0):
        with pytest.raises(DataError, match="--max-bad-records .*give a count of records"):
            DataOptions(paths=("x",), max_bad_records=wrong)


def test_compressed_inputs_and_any_case_are_read_like_plain_ones(tmp_path):
    plain = _lines(GOOD)
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl.gz").write_bytes(gzip.compress(plain))
    zc = zstandard.ZstdCompressor()
    (d / "b.JSONL.ZST").write_bytes(zc.compress(plain[:40]) + zc.compress(plain[40:]))  # two frames
    (d / "c.Jsonl").write_bytes(plain)
    (d / "sub" / "d.txt.gz").write_bytes(gzip.compress(b"a whole document"))
    (d / "sub" / "e.TXT.zst").write_bytes(zc.compress(b"another one"))
    docs, counts, reported = _read(DataOptions(paths=(str(d),)))
    want = [GOOD[0]["text"], GOOD[1]["text"], GOOD[2]["messages"]]
    assert [x.text or x.messages for x in docs] == want * 3 + ["a whole document", "another one"]
    assert counts.read == 11 and not reported
    assert count_documents(DataOptions(paths=(str(d),))) == 11


def test_damaged_compressed_files_are_errors_naming_the_file(tmp_path):
    body = _lines([GOOD[0]] * 200)
    cases = {"cut.jsonl.gz": gzip.compress(body)[:-12], "cut.jsonl.zst": zstandard.ZstdCompressor().compress(body)[:-6],
             "garbage.jsonl.gz": b"not gzip at all", "garbage.jsonl.zst": b"not zstd at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: the (gz|zst) stream is damaged or cut short after line \d+"):
            _read(DataOptions(paths=(str(tmp_path / name),)))


def test_a_data_directory_lists_what_it_does_not_read(tmp_path):
    d = tmp_path / "data"
    (d / "hf").mkdir(parents=True)
    (d / "a.jsonl").write_bytes(_lines(GOOD[:1]))
    for name in ("notes.csv", "README", "b.jsonl.bz2", "c.parquet.gz", ".DS_Store", "hf/state.json",
                 "hf/dataset_info.json"):
        (d / name).write_text("{\n}\n")
    scan = scan_inputs([str(d)])
    assert scan.files == [d / "a.jsonl"]
    ignored = {f.relative_to(d).as_posix(): why for f, why in scan.ignored}
    assert set(ignored) == {"notes.csv", "README", "b.jsonl.bz2", "c.parquet.gz", ".DS_Store", "hf/state.json",
                            "hf/dataset_info.json"}
    assert ignored["hf/state.json"] == "datasets metadata"
    assert ignored["notes.csv"].startswith("not a file type the build reads: .jsonl, .json, .parquet, .txt, .arrow")
    docs, counts, reported = _read(DataOptions(paths=(str(d),)))  # metadata .json is not read as documents
    assert len(docs) == 1 and counts.read == 1 and not reported

    (d / "a.jsonl").unlink()
    with pytest.raises(DataError, match=r"data: no file in this directory the build reads \(.*\) \(it has "):
        scan_inputs([str(d)])
    with pytest.raises(DataError, match=r"c.parquet.gz: unknown input type '.parquet.gz'; use one of .*compressed"):
        scan_inputs([str(d / "c.parquet.gz")])


def test_data_options_are_validated():
    for kwargs, match in (({"seq_len": 1}, r"seq_len \(--seq-len\) must be a finite integer in \[2, inf\], got 1"),
                          ({"seq_len": 64.5}, "seq_len"), ({"seq_len": float("nan")}, "seq_len"),
                          ({"max_docs": 0}, r"max_docs \(--max-docs\)"), ({"max_docs": float("inf")}, "max_docs")):
        with pytest.raises(OptionError, match=match):
            DataOptions(paths=("x",), **kwargs)
