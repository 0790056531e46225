"""Inputs of the teacher pass: every format read, every document accounted for, packing and the chat
loss mask, with the demo teacher's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from teachercache.teacher.corpus import DataError, DataOptions, DocumentCounts, iter_documents, iter_packed_rows

TEACHER = Path(__file__).resolve().parents[3] / "data" / "teacher"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TEACHER)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    t = AutoTokenizer.from_pretrained(TEACHER)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tok")
    t.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def _write_jsonl(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines))
    return path


def test_jsonl_documents_are_all_accounted_for(tmp_path):
    f = _write_jsonl(tmp_path / "a.jsonl", [{"text": "def f(): pass"}, {"text": ""}, {"body": "x"},
                                            b"{not json", {"text": 5}, b"\xff\xfe", {"text": "x = 1"}])
    counts = DocumentCounts()
    docs = list(iter_documents(DataOptions(paths=(str(f),)), counts))
    assert [d.text for d in docs] == ["def f(): pass", "x = 1"]
    assert counts.read == 7
    assert dict(counts.skipped) == {"empty": 1, "missing field": 1, "undecodable": 3}
    counts = DocumentCounts()
    assert len(list(iter_documents(DataOptions(paths=(str(f),), max_docs=3), counts))) == 1
    assert counts.read == 3 and sum(counts.skipped.values()) == 2


def test_parquet_txt_directory_and_arrow_inputs(tmp_path):
    pq.write_table(pa.table({"content": ["a = 1", "", "b = 2"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text'.*--text-field"):
        list(iter_documents(DataOptions(paths=(str(tmp_path / "p.parquet"),)), DocumentCounts()))
    counts = DocumentCounts()
    docs = list(iter_documents(DataOptions(paths=(str(tmp_path / "p.parquet"),), text_field="content"), counts))
    assert [d.text for d in docs] == ["a = 1", "b = 2"] and counts.skipped == {"empty": 1}

    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second")
    (d / "sub" / "a.txt").write_text("first")
    (d / "bad.txt").write_bytes(b"\xff\xfe bad")
    counts = DocumentCounts()
    assert [x.text for x in iter_documents(DataOptions(paths=(str(d),)), counts)] == ["second", "first"]
    assert counts.read == 3 and counts.skipped == {"undecodable": 1}

    hf = tmp_path / "hf_dataset"  # the layout datasets' save_to_disk writes: Arrow IPC stream files
    hf.mkdir()
    table = pa.table({"text": ["one", "two"], "id": [1, 2]})
    with ipc.new_stream(str(hf / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (hf / "state.json").write_text("{}")
    assert [x.text for x in iter_documents(DataOptions(paths=(str(hf),)), DocumentCounts())] == ["one", "two"]


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(iter_documents(DataOptions(paths=(str(tmp_path / "nope.jsonl"),)), DocumentCounts()))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown input type '.csv'"):
        list(iter_documents(DataOptions(paths=(str(tmp_path / "x.csv"),)), DocumentCounts()))
    with pytest.raises(DataError, match="--packing"):
        DataOptions(paths=("x",), packing="zip")


def test_concat_packing_keeps_every_token_and_masks_only_row_ends(tmp_path, tok):
    texts = [f"def f{i}(x):\n    return x * {i}\n" * (i + 1) for i in range(6)]
    f = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    counts = DocumentCounts()
    rows = list(iter_packed_rows(DataOptions(paths=(str(f),), seq_len=16), tok, counts))
    stream = np.concatenate([r.input_ids for r in rows])
    want = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts), [])
    assert stream.tolist() == want  # nothing lost, nothing added but EOS between documents
    assert all(len(r.input_ids) == 16 for r in rows[:-1]) and 0 < len(rows[-1].input_ids) <= 16
    for r in rows:
        assert r.target_mask[:-1].all() and not r.target_mask[-1]
    assert counts.read == counts.used == 6


def test_document_packing_splits_long_documents(tmp_path, tok):
    f = _write_jsonl(tmp_path / "a.jsonl", [{"text": "x = 1\n" * 20}, {"text": "y"}])
    rows = list(iter_packed_rows(DataOptions(paths=(str(f),), seq_len=8, packing="document"), tok, DocumentCounts()))
    n = len(tok("x = 1\n" * 20, add_special_tokens=False)["input_ids"])
    assert [len(r.input_ids) for r in rows] == [8] * (n // 8) + ([n % 8] if n % 8 else []) + [1]


def test_chat_targets_are_the_assistant_turns_only(tmp_path, chat_tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "Times 4?"},
            {"role": "assistant", "content": "20, since 5 * 4 = 20."}]
    f = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    (row,) = list(iter_packed_rows(DataOptions(paths=(str(f),), seq_len=512, packing="document"), chat_tok,
                            DocumentCounts()))
    ids = row.input_ids.tolist()
    assert chat_tok.decode(ids) == chat_tok.apply_chat_template(conv, tokenize=False)  # the template's own
    labels = [ids[t + 1] for t in np.flatnonzero(row.target_mask)]
    assert chat_tok.decode(labels) == "5<|im_end|>\n20, since 5 * 4 = 20.<|im_end|>\n"


def test_chat_without_a_template_is_refused(tmp_path, tok):
    f = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no chat_template"):
        list(iter_packed_rows(DataOptions(paths=(str(f),)), tok, DocumentCounts()))


def test_count_documents_matches_what_the_pass_reads(tmp_path):
    from teachercache.teacher.corpus import count_documents

    f = _write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": ""}, b"{bad", {"text": "b"}])
    pq.write_table(pa.table({"text": ["x", "y", "z"]}), tmp_path / "b.parquet")
    opts = DataOptions(paths=(str(f), str(tmp_path / "b.parquet")))
    counts = DocumentCounts()
    list(iter_documents(opts, counts))
    assert count_documents(opts) == counts.read == 7
    assert count_documents(DataOptions(paths=opts.paths, max_docs=5)) == 5
