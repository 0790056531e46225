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
from teachercache.interop.openai_chat import SKIP_REASONS, ApiImportOptions, ImportApiError, TokenMap, import_api

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


# --- Lines that cannot become a row, and OpenAI Batch files -------------------------------------------------
# Shapes from OpenAI's API reference (its OpenAPI spec, github.com/openai/openai-openapi openapi.yaml): "The chat
# completion object" (CreateChatCompletionResponse), "The request input object" (BatchRequestInput, a line of a
# Batch input file) and "The request output object" (BatchRequestOutput, a line of a Batch output or error file).

ASK = [{"role": "user", "content": "Add two numbers."}]


def chat_completion(message: dict, logprobs, finish_reason: str = "stop") -> dict:
    """The chat completion object: one choice with ``message``, ``logprobs`` and ``finish_reason``."""
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 1741570283, "model": "demo-teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": None, **message},
                         "logprobs": logprobs, "finish_reason": finish_reason}]}


def good_records() -> list[dict]:
    return [json.loads(line) for line in GOOD.read_text().splitlines()]


# The request output object: the request got an HTTP error; response.body is an error object (ErrorResponse).
FAILED_HTTP = {"id": "batch_req_400", "custom_id": "req-bad-role", "error": None,
               "response": {"status_code": 400, "request_id": "req_7f3a",
                            "body": {"error": {"message": "messages[0].role: 'robot' is not a known role",
                                               "type": "invalid_request_error", "param": "messages[0].role",
                                               "code": None}}}}
# The request output object: the request failed without a response (error has code and message).
FAILED_NO_RESPONSE = {"id": "batch_req_exp", "custom_id": "req-expired", "response": None,
                      "error": {"code": "batch_expired", "message": "not run within the completion window"}}
# The chat completion object, a refusal: message.refusal set, message.content null, logprobs.content null and
# logprobs.refusal the refusal's tokens.
REFUSAL = {"messages": ASK, "response": chat_completion(
    {"refusal": "No."}, {"content": None, "refusal": [
        {"token": "No", "logprob": -0.01, "bytes": [78, 111],
         "top_logprobs": [{"token": "No", "logprob": -0.01, "bytes": [78, 111]}]},
        {"token": ".", "logprob": -0.02, "bytes": [46],
         "top_logprobs": [{"token": ".", "logprob": -0.02, "bytes": [46]}]}]})}
# The chat completion object, a tool call: message.tool_calls set (ChatCompletionMessageToolCall), content null,
# logprobs.content [] and finish_reason tool_calls.
TOOL_CALL = {"messages": ASK, "response": chat_completion(
    {"tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
    {"content": [], "refusal": None}, finish_reason="tool_calls")}
# The chat completion object with an empty answer: message.content "" and logprobs.content [].
EMPTY = {"messages": ASK, "response": chat_completion({"content": ""}, {"content": [], "refusal": None})}


def filtered() -> dict:
    """The chat completion object cut by the content filter: a good answer, finish_reason content_filter."""
    rec = good_records()[0]
    rec["response"]["choices"][0]["finish_reason"] = "content_filter"
    return rec


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def mixed_file(tmp_path) -> Path:
    good = good_records()
    return write_jsonl(tmp_path / "mixed.jsonl", [good[0], FAILED_HTTP, REFUSAL, good[1], TOOL_CALL,
                                                  FAILED_NO_RESPONSE, EMPTY, filtered(), good[2]])


def test_unusable_lines_skipped_and_counted(chat_teacher, tmp_path):
    mixed = mixed_file(tmp_path)
    manifest, report = import_api(mixed, chat_teacher, tmp_path / "mixed")
    _, alone = import_api(GOOD, chat_teacher, tmp_path / "good")
    write_jsonl(tmp_path / "first.jsonl", good_records()[:1])
    import_api(tmp_path / "first.jsonl", chat_teacher, tmp_path / "first")
    rows = rows_of(tmp_path / "mixed")
    assert (report.records, report.rows, len(rows)) == (9, 3, 3)
    assert rows == rows_of(tmp_path / "good")                     # exactly the good lines, value for value
    assert rows[0] == rows_of(tmp_path / "first")[0]              # ... and each as when imported alone
    assert report.skipped == {"failed request": 2, "refusal": 1, "tool call": 1, "content filter": 1,
                              "empty answer": 1}
    assert report.rows + report.skipped_records == report.records
    assert (report.tokens, report.unmapped) == (alone.tokens, 0)  # skipped answers' tokens are not counted
    assert report.lines()[-1] == (f"  skipped 6 of 9 records: failed request x2 (first at {mixed}:2), refusal x1 "
                                  f"(first at {mixed}:3), tool call x1 (first at {mixed}:5), content filter x1 "
                                  f"(first at {mixed}:8), empty answer x1 (first at {mixed}:7)")
    assert manifest.data.documents_skipped == dict(report.skipped)
    assert (manifest.data.documents_read, manifest.data.documents_used) == (9, 3)
    assert verify_cache(tmp_path / "mixed", deep=True) == []


def test_strict_refuses_the_first_unusable_line(chat_teacher, tmp_path):
    mixed = mixed_file(tmp_path)
    with pytest.raises(ImportApiError) as e:
        import_api(mixed, chat_teacher, tmp_path / "out", ApiImportOptions(strict=True))
    msg = str(e.value)
    assert msg.startswith(f"{mixed}:2: field response.status_code is 400 (invalid_request_error: messages[0].role")
    assert SKIP_REASONS["failed request"] in msg and "without --strict" in msg
    assert "(here 6 of 9: failed request x2, refusal x1, tool call x1, empty answer x1, content filter x1)" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("record, reason, problem", [
    (FAILED_HTTP, "failed request", "field response.status_code is 400 (invalid_request_error: "),
    (FAILED_NO_RESPONSE, "failed request", "field error is set (batch_expired: not run within the completion window)"),
    (REFUSAL, "refusal", "field response.choices[0].message.refusal is set (No.)"),
    (TOOL_CALL, "tool call", "field response.choices[0].message.tool_calls is set"),
    (EMPTY, "empty answer", "field response.choices[0].logprobs.content is []"),
    (None, "content filter", "field response.choices[0].finish_reason is 'content_filter'"),
])
def test_strict_names_line_field_and_fix(chat_teacher, tmp_path, record, reason, problem):
    path = write_jsonl(tmp_path / "one.jsonl", [good_records()[0], record or filtered()])
    _, report = import_api(path, chat_teacher, tmp_path / "lenient")
    assert report.skipped == {reason: 1} and report.rows == 1
    with pytest.raises(ImportApiError) as e:
        import_api(path, chat_teacher, tmp_path / "strict", ApiImportOptions(strict=True))
    assert str(e.value).startswith(f"{path}:2: {problem}") and SKIP_REASONS[reason] in str(e.value)


def test_strict_refuses_an_unmapped_answer_token(chat_teacher, tmp_path):
    answers = [[c["token"] for c in json.loads(line)["response"]["choices"][0]["logprobs"]["content"]]
               for line in FOREIGN.read_text().splitlines()]
    first = next(n for n, tokens in enumerate(answers, 1) if "😀" in tokens)   # the first unmappable chosen token
    index = answers[first - 1].index("😀")
    with pytest.raises(ImportApiError) as e:
        import_api(FOREIGN, chat_teacher, tmp_path / "out", ApiImportOptions(max_unmapped=0.2, strict=True))
    assert str(e.value).startswith(f"{FOREIGN}:{first}: field response.choices[0].logprobs.content[{index}].token "
                                   "'😀' is not in the vocabulary of --tokenizer")
    assert "unmapped token x2" in str(e.value)


def batch_input_line(custom_id: str, messages: list) -> dict:
    """The request input object: one line of an OpenAI Batch input file."""
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "demo-teacher", "messages": messages, "logprobs": True, "top_logprobs": 5}}


def batch_output_line(custom_id: str, completion: dict) -> dict:
    """The request output object: one line of an OpenAI Batch output file, for a request that succeeded."""
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "request_id": f"req_{custom_id}", "body": completion}}


def test_batch_join_equals_inline_records(chat_teacher, tmp_path):
    good = good_records()
    inputs = write_jsonl(tmp_path / "batch_input.jsonl", [batch_input_line(f"req-{i}", r["messages"])
                                                          for i, r in enumerate(good)])
    order = [2, 0, 1]                              # output lines in another order than the requests
    outputs = write_jsonl(tmp_path / "batch_output.jsonl", [batch_output_line(f"req-{i}", good[i]["response"])
                                                            for i in order])
    inline = write_jsonl(tmp_path / "inline.jsonl", [good[i] for i in order])
    manifest, report = import_api(outputs, chat_teacher, tmp_path / "batch", requests=inputs)
    import_api(inline, chat_teacher, tmp_path / "inline")
    import_api(GOOD, chat_teacher, tmp_path / "good")
    assert (report.records, report.rows, report.skipped_records, report.unanswered) == (3, 3, 0, 0)
    assert rows_of(tmp_path / "batch") == rows_of(tmp_path / "inline")
    assert rows_of(tmp_path / "batch") == [rows_of(tmp_path / "good")[i] for i in order]   # each with its messages
    assert manifest.data.sources == [str(outputs), str(inputs)] and manifest.extra["requests_without_output"] == 0
    assert report.lines()[-1] == "  skipped 0 of 3 records"
    assert verify_cache(tmp_path / "batch", deep=True) == []


def test_batch_unknown_ids_and_requests_without_output(chat_teacher, tmp_path):
    good = good_records()
    inputs = write_jsonl(tmp_path / "in.jsonl", [batch_input_line(f"req-{i}", r["messages"]) for i, r in
                                                 enumerate(good)] + [batch_input_line("req-unanswered", ASK)])
    failed = {**FAILED_NO_RESPONSE, "custom_id": "req-1"}
    outputs = write_jsonl(tmp_path / "out.jsonl", [
        batch_output_line("req-0", good[0]["response"]), batch_output_line("req-x", good[1]["response"]), failed,
        batch_output_line("req-y", good[2]["response"]), batch_output_line("req-2", good[2]["response"])])
    _, report = import_api(outputs, chat_teacher, tmp_path / "cache", requests=inputs)
    assert (report.records, report.rows) == (5, 2)
    assert report.skipped == {"unknown custom_id": 2, "failed request": 1}
    assert (report.unknown_ids, report.unanswered, report.unanswered_ids) == (["req-x", "req-y"], 1, ["req-unanswered"])
    assert report.lines()[-1] == (f"  skipped 3 of 5 records: failed request x1 (first at {outputs}:3), unknown "
                                  f"custom_id x2 (first at {outputs}:2; ids 'req-x', 'req-y'); requests of --requests "
                                  "with no output line: 1 ('req-unanswered')")
    assert rows_of(tmp_path / "cache") == rows_of_inline(chat_teacher, tmp_path, [good[0], good[2]])
    with pytest.raises(ImportApiError, match=r"out.jsonl:2: field custom_id 'req-x' names no request of "
                                             r"--requests; give as --requests the Batch input file"):
        import_api(outputs, chat_teacher, tmp_path / "strict", ApiImportOptions(strict=True), requests=inputs)
    answered = write_jsonl(tmp_path / "answered.jsonl", [batch_output_line(f"req-{i}", r["response"])
                                                         for i, r in enumerate(good)])
    with pytest.raises(ImportApiError, match=r"in.jsonl: requests with no line in .*answered.jsonl: 1 "
                                             r"\('req-unanswered'\); a Batch's failed requests are in its error file"):
        import_api(answered, chat_teacher, tmp_path / "strict", ApiImportOptions(strict=True), requests=inputs)
    assert not (tmp_path / "strict").exists()


def rows_of_inline(chat_teacher, tmp_path, records: list[dict]) -> list[dict]:
    """The decoded rows of ``records`` imported as inline lines (the reference a Batch join must equal)."""
    path = write_jsonl(tmp_path / "reference.jsonl", records)
    import_api(path, chat_teacher, tmp_path / "reference", ApiImportOptions(overwrite=True))
    return rows_of(tmp_path / "reference")


def test_batch_duplicates_and_missing_requests_refused(chat_teacher, tmp_path):
    good = good_records()
    inputs = write_jsonl(tmp_path / "in.jsonl", [batch_input_line("req-0", ASK), batch_input_line("req-1", ASK),
                                                 batch_input_line("req-0", ASK)])
    outputs = write_jsonl(tmp_path / "out.jsonl", [batch_output_line("req-0", good[0]["response"]),
                                                   batch_output_line("req-0", good[1]["response"])])
    with pytest.raises(ImportApiError, match=r"in.jsonl:3: custom_id 'req-0' is already used at .*in.jsonl:1; "
                                             r"custom_ids are unique in a Batch input file"):
        import_api(outputs, chat_teacher, tmp_path / "a", requests=inputs)
    unique = write_jsonl(tmp_path / "unique.jsonl", [batch_input_line("req-0", ASK)])
    with pytest.raises(ImportApiError, match=r"out.jsonl:2: custom_id 'req-0' is already answered at .*out.jsonl:1"):
        import_api(outputs, chat_teacher, tmp_path / "b", requests=unique)
    with pytest.raises(ImportApiError, match=r"out.jsonl:1: field messages missing: this is a Batch output line "
                                             r"\(custom_id 'req-0'\).* --requests batch_input.jsonl"):
        import_api(outputs, chat_teacher, tmp_path / "c")
    with pytest.raises(ImportApiError, match=r"--requests .*nowhere.jsonl: no such file"):
        import_api(outputs, chat_teacher, tmp_path / "d", requests=tmp_path / "nowhere.jsonl")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_cli_import_api_batch(chat_teacher, tmp_path):
    good = good_records()
    inputs = write_jsonl(tmp_path / "in.jsonl", [batch_input_line(f"req-{i}", r["messages"])
                                                 for i, r in enumerate(good)])
    outputs = write_jsonl(tmp_path / "out.jsonl", [batch_output_line("req-0", good[0]["response"]),
                                                   {**FAILED_HTTP, "custom_id": "req-1"},
                                                   batch_output_line("req-2", good[2]["response"])])
    runner = CliRunner()
    args = ["import-api", str(outputs), "--requests", str(inputs), "--tokenizer", str(chat_teacher)]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "3 records -> 2 rows" in result.output
    assert f"skipped 1 of 3 records: failed request x1 (first at {outputs}:2)" in result.output
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "b"), "--strict"])
    assert result.exit_code == 1 and f"{outputs}:2: field response.status_code is 400" in result.output
