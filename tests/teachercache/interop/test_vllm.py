"""`teachercache import-vllm`: vLLM prompt_logprobs (tests/fixtures/vllm_prompt_logprobs.jsonl, in
vLLM's serialised shape, made from the demo teacher with k=5: each element holds the 5 most likely ids
and the actual token, with logprob, rank and decoded_token) become a cache whose targets are the file's
values; the cache passes verify --deep and exports back to the same ids and probabilities."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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


# ---------------------------------------------------------------- the shapes vLLM writes
# The fixture's three prompts, rewritten in each shape vLLM emits; every cache must hold exactly the targets of
# the flat file (the fixture itself), and those must be the file's values (checked against the records).

@dataclass
class Logprob:
    """Mirrors vLLM's ``Logprob`` dataclass (vllm/logprobs.py): one scored id."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """Mirrors vLLM's ``CompletionOutput`` dataclass (vllm/outputs.py): one sample of a request."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list | None
    routed_experts: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: None = None
    kv_transfer_params: dict | None = None


def _records():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def _usage(records, completion_tokens):
    """Mirrors ``UsageInfo`` (vllm/entrypoints/openai/engine/protocol.py)."""
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in records)
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def completion_response(records, n=1, token_ids=True):
    """Mirrors ``CompletionResponse`` with ``CompletionResponseChoice`` entries
    (vllm/entrypoints/openai/completion/protocol.py) for a request with a list of prompts and n samples each:
    choice index runs over prompts x n; prompt_token_ids / token_ids only when return_token_ids was set."""
    choices = []
    for r in records:
        for _ in range(n):
            choices.append({"index": len(choices), "text": " x", "logprobs": None, "finish_reason": "length",
                            "stop_reason": None, "token_ids": [65] if token_ids else None,
                            "prompt_logprobs": r["prompt_logprobs"],
                            "prompt_token_ids": r["prompt_token_ids"] if token_ids else None,
                            "routed_experts": None})
    return {"id": "cmpl-7f3a", "object": "text_completion", "created": 1730000000, "model": "teacher",
            "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": _usage(records, len(choices)), "kv_transfer_params": None, "ec_transfer_params": None,
            "metrics": None}


def chat_response(record):
    """Mirrors ``ChatCompletionResponse`` with one ``ChatCompletionResponseChoice``
    (vllm/entrypoints/openai/chat_completion/protocol.py): prompt_logprobs, prompt_token_ids and prompt_text
    are top-level fields."""
    return {"id": "chatcmpl-91c2", "object": "chat.completion", "created": 1730000000, "model": "teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok", "refusal": None,
                                                 "annotations": None, "audio": None, "function_call": None,
                                                 "reasoning": None},
                         "logprobs": None, "finish_reason": "stop", "stop_reason": None, "token_ids": [65],
                         "routed_experts": None}],
            "service_tier": None, "system_fingerprint": None, "usage": _usage([record], 1),
            "prompt_logprobs": record["prompt_logprobs"], "prompt_token_ids": record["prompt_token_ids"],
            "prompt_text": None, "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def request_output(record, request_id, flat=False):
    """Mirrors ``RequestOutput`` (vllm/outputs.py, a plain class) written as a dict of its attributes, its
    ``CompletionOutput`` and ``Logprob`` dataclasses through dataclasses.asdict; ``flat``: prompt_logprobs as
    vLLM's ``FlatLogprobs`` dataclass (vllm/logprobs.py) through dataclasses.asdict."""
    positions = [None if p is None else {int(t): Logprob(**v) for t, v in p.items()}
                 for p in record["prompt_logprobs"]]
    if flat:
        lists = {"start_indices": [], "end_indices": [], "token_ids": [], "logprobs": [], "ranks": [],
                 "decoded_tokens": []}
        for p in positions:
            lists["start_indices"].append(len(lists["token_ids"]))
            for t, lp in (p or {}).items():
                lists["token_ids"].append(t)
                lists["logprobs"].append(lp.logprob)
                lists["ranks"].append(lp.rank)
                lists["decoded_tokens"].append(lp.decoded_token)
            lists["end_indices"].append(len(lists["token_ids"]))
        prompt_logprobs = lists
    else:
        prompt_logprobs = [None if p is None else {t: asdict(lp) for t, lp in p.items()} for p in positions]
    output = CompletionOutput(index=0, text=" x", token_ids=[65], cumulative_logprob=-1.5, logprobs=None,
                              finish_reason="length")
    return {"request_id": request_id, "prompt": record["prompt"], "prompt_token_ids": record["prompt_token_ids"],
            "prompt_logprobs": prompt_logprobs, "outputs": [asdict(output)], "finished": True, "metrics": None,
            "lora_request": None, "encoder_prompt": None, "encoder_prompt_token_ids": None,
            "num_cached_tokens": 0}


def _write_jsonl(path, values):
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    return path


def _targets(cache_dir):
    """Every row's tokens and decoded targets, for comparing caches built from different shapes."""
    return [(r.input_ids.tolist(), r.positions.tolist(), r.offsets.tolist(), r.ids.tolist(), r.logprobs.tolist(),
             r.label_logprob.tolist(), r.rest_mass.tolist(), r.entropy.tolist())
            for r in iter_cache_rows(Cache.open(cache_dir))]


@pytest.fixture
def flat_targets(tmp_path):
    """The targets of the cache of the flat fixture (what the round-trip test checks against the file)."""
    import_vllm(FIXTURE, TOKENIZER, tmp_path / "flat")
    return _targets(tmp_path / "flat")


def _assert_same_as_flat(cache_dir, flat_targets):
    records = _records()
    got = _targets(cache_dir)
    assert got == flat_targets
    q = Cache.open(cache_dir).layout.quantizer
    for record, (input_ids, positions, offsets, ids, lps, labels, rest, _) in zip(records, got, strict=True):
        assert input_ids == record["prompt_token_ids"] and positions == list(range(len(input_ids) - 1))
        for j in range(len(input_ids) - 1):
            want_ids, want_lps, want_label = _expected(record, j + 1)
            stored = dict(zip(ids[offsets[j]:offsets[j + 1]], lps[offsets[j]:offsets[j + 1]]))
            assert sorted(stored) == sorted(want_ids)
            assert all(abs(stored[t] - lp) <= q.max_error(-lp) + 1e-6 for t, lp in zip(want_ids, want_lps))
            assert labels[j] == pytest.approx(want_label, abs=0.5 / 1024 + 1e-6)
            assert rest[j] == pytest.approx(1 - np.exp(want_lps).sum(), abs=1 / 65535 + 1e-6)


def test_completions_response_as_jsonl_array_and_single_object(tmp_path, flat_targets):
    records = _records()
    one_per_line = _write_jsonl(tmp_path / "responses.jsonl", [completion_response([r]) for r in records])
    array = tmp_path / "responses.json"
    array.write_text(json.dumps([completion_response([r]) for r in records]))  # one line, as json.dump writes
    pretty = tmp_path / "response.json"
    pretty.write_text(json.dumps(completion_response(records), indent=2))  # one request, a list of 3 prompts
    for i, path in enumerate([one_per_line, array, pretty]):
        m = import_vllm(path, TOKENIZER, tmp_path / f"c{i}")
        assert m.totals.rows == 3 and m.extra["repeated_choices"] == 0
        _assert_same_as_flat(tmp_path / f"c{i}", flat_targets)


def test_n_choices_of_one_prompt_are_stored_once(tmp_path, flat_targets):
    records = _records()
    path = _write_jsonl(tmp_path / "n2.jsonl", [completion_response([r], n=2) for r in records])
    result = CliRunner().invoke(main, ["import-vllm", str(path), "--tokenizer", str(TOKENIZER),
                                       "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "3 choices repeated an earlier choice's prompt" in result.output
    m = Cache.open(tmp_path / "c").manifest
    assert m.totals.rows == 3 and m.extra["repeated_choices"] == 3
    assert m.data.documents_read == 6 and m.data.documents_used == 3
    _assert_same_as_flat(tmp_path / "c", flat_targets)
    # the same prompt in two responses is two requests: both stored
    twice = _write_jsonl(tmp_path / "twice.jsonl", [completion_response([records[0]])] * 2)
    assert import_vllm(twice, TOKENIZER, tmp_path / "d").totals.rows == 2


def test_chat_completions_response(tmp_path, flat_targets):
    path = _write_jsonl(tmp_path / "chat.jsonl", [chat_response(r) for r in _records()])
    import_vllm(path, TOKENIZER, tmp_path / "c")
    _assert_same_as_flat(tmp_path / "c", flat_targets)


def batch_output_line(body, i, status=200, error=None):
    """Mirrors ``BatchRequestOutput`` with ``BatchResponseData`` (vllm/entrypoints/openai/run_batch.py): the
    per-line object of ``vllm run-batch``'s output file."""
    return {"id": f"vllm-{i:04x}", "custom_id": f"request-{i}", "error": error,
            "response": {"status_code": status, "request_id": f"vllm-batch-{i:04x}", "body": body}}


def test_run_batch_output_file(tmp_path, flat_targets):
    lines = [batch_output_line(chat_response(r), i) for i, r in enumerate(_records())]
    path = _write_jsonl(tmp_path / "batch_output.jsonl", lines)
    import_vllm(path, TOKENIZER, tmp_path / "c")
    _assert_same_as_flat(tmp_path / "c", flat_targets)
    lines[1] = batch_output_line(None, 1, status=400, error=None)
    with pytest.raises(VllmImportError, match=r"failed.jsonl:2: custom_id 'request-1': the batch request "
                                              r"failed .*rerun it, or drop the line"):
        import_vllm(_write_jsonl(tmp_path / "failed.jsonl", lines), TOKENIZER, tmp_path / "d")


@pytest.mark.parametrize("flat", [False, True], ids=["logprob-dicts", "flat-logprobs"])
def test_offline_request_output_dump(tmp_path, flat_targets, flat):
    outputs = [request_output(r, str(i), flat=flat) for i, r in enumerate(_records())]
    path = tmp_path / "generate.json"
    path.write_text(json.dumps(outputs, indent=1))  # a pretty-printed array: element i starts on its own line
    import_vllm(path, TOKENIZER, tmp_path / "c")
    _assert_same_as_flat(tmp_path / "c", flat_targets)


def test_missing_prompt_token_ids_names_the_record_choice_and_fix(tmp_path):
    records = _records()
    path = _write_jsonl(tmp_path / "noids.jsonl", [completion_response([records[0]]),
                                                    completion_response([records[1]], token_ids=False)])
    with pytest.raises(VllmImportError, match=r"noids.jsonl:2 choices\[0\]: prompt_token_ids is missing .*"
                                              r"set return_token_ids: true in the request"):
        import_vllm(path, TOKENIZER, tmp_path / "c")
    array = tmp_path / "noids.json"
    array.write_text(json.dumps([completion_response([records[0]]), completion_response(records, token_ids=False)]))
    with pytest.raises(VllmImportError, match=r"noids.json:1 \[1\] choices\[0\]: prompt_token_ids is missing"):
        import_vllm(array, TOKENIZER, tmp_path / "d")
    chat = chat_response(records[0]) | {"prompt_token_ids": None}
    _write_jsonl(tmp_path / "chat.jsonl", [chat])
    with pytest.raises(VllmImportError, match=r"chat.jsonl:1: prompt_token_ids is missing .*return_token_ids: true"):
        import_vllm(tmp_path / "chat.jsonl", TOKENIZER, tmp_path / "e")
    response = completion_response([records[0]])
    response["choices"][0]["prompt_logprobs"] = None
    _write_jsonl(tmp_path / "nolps.jsonl", [response])
    with pytest.raises(VllmImportError, match=r"nolps.jsonl:1 choices\[0\]: prompt_logprobs is missing or null; "
                                              r"send prompt_logprobs=k"):
        import_vllm(tmp_path / "nolps.jsonl", TOKENIZER, tmp_path / "f")


def test_prompt_text_is_tokenized_and_accepted_when_it_matches(tmp_path, flat_targets):
    records = _records()
    joined = [completion_response([r], token_ids=False) | {"prompt": r["prompt"]} for r in records]  # user-joined
    import_vllm(_write_jsonl(tmp_path / "joined.jsonl", joined), TOKENIZER, tmp_path / "c")
    _assert_same_as_flat(tmp_path / "c", flat_targets)
    offline = [request_output(r, str(i)) | {"prompt_token_ids": None} for i, r in enumerate(records)]
    import_vllm(_write_jsonl(tmp_path / "offline.jsonl", offline), TOKENIZER, tmp_path / "d")
    _assert_same_as_flat(tmp_path / "d", flat_targets)
    chat = [chat_response(r) | {"prompt_token_ids": None, "prompt_text": r["prompt"]} for r in records]
    import_vllm(_write_jsonl(tmp_path / "chat.jsonl", chat), TOKENIZER, tmp_path / "e")
    _assert_same_as_flat(tmp_path / "e", flat_targets)


def test_prompt_text_that_disagrees_is_refused(tmp_path):
    from teachercache.interop.logprobs import read_tokenizer

    record = _records()[0]
    tok = read_tokenizer(TOKENIZER, VllmImportError)
    # same token count, one different token: the importer must name the first position whose token vLLM did
    # not score (reference computed here from the tokenizer and the file)
    altered = record["prompt"].replace("(a, b)", "(a, c)")
    ids = tok.encode(altered)
    assert len(ids) == len(record["prompt_token_ids"]) and ids != record["prompt_token_ids"]
    bad = [i for i in range(1, len(ids)) if str(ids[i]) not in record["prompt_logprobs"][i]]
    assert bad == [5]
    response = completion_response([record], token_ids=False) | {"prompt": altered}
    with pytest.raises(VllmImportError, match=r"wrong.jsonl:1 choices\[0\]: prompt_token_ids is missing, and the "
                                              r"prompt text tokenized with --tokenizer disagrees with prompt_logprobs "
                                              rf"at position 5: its token {ids[5]} .*set return_token_ids: true"):
        import_vllm(_write_jsonl(tmp_path / "wrong.jsonl", [response]), TOKENIZER, tmp_path / "c")
    longer = record["prompt"] + "print(add(1, 2))\n"
    n = len(tok.encode(longer))
    response = request_output(record, "0") | {"prompt_token_ids": None, "prompt": longer}
    with pytest.raises(VllmImportError, match=rf"long.jsonl:1: prompt_token_ids is missing, and the prompt text "
                                              rf"tokenizes to {n} tokens with --tokenizer, not the 13 that "
                                              r"prompt_logprobs has; set return_token_ids: true"):
        import_vllm(_write_jsonl(tmp_path / "long.jsonl", [response]), TOKENIZER, tmp_path / "d")
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_records_without_prompt_logprobs_are_refused(tmp_path):
    chat = chat_response(_records()[0]) | {"prompt_logprobs": None}
    with pytest.raises(VllmImportError, match=r"none.jsonl:1: no prompt_logprobs, neither at the top level .* "
                                              r"send prompt_logprobs=k"):
        import_vllm(_write_jsonl(tmp_path / "none.jsonl", [chat]), TOKENIZER, tmp_path / "c")
    (tmp_path / "broken.json").write_text("[" + json.dumps(_records()[0]) + ',\n {"b": ]')
    with pytest.raises(VllmImportError, match=r"broken.json:2: element \[1\] is not valid JSON"):
        import_vllm(tmp_path / "broken.json", TOKENIZER, tmp_path / "d")
