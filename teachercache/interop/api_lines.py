"""What a line of an OpenAI-compatible log-probs file is, for ``teachercache import-api``: an answer that can
become a row (``Answer``), a line skipped for a reason (``Skip``, ``SKIP_REASONS``), or an error (a line of
the wrong shape). ``iter_lines`` reads the inline layout or, with ``read_requests``' table, an OpenAI Batch
output file joined with its input file on ``custom_id``.

The shapes are those of OpenAI's API reference, as its OpenAPI spec (github.com/openai/openai-openapi,
``openapi.yaml``) defines them:

* "The chat completion object" (``CreateChatCompletionResponse``; platform.openai.com/docs/api-reference/
  chat/object): ``choices[0].message`` has ``content``, ``refusal`` and ``tool_calls``, each may be null;
  ``choices[0].logprobs`` is null unless the request set ``logprobs: true``, else ``{"content": [...] | null,
  "refusal": [...] | null}``, lists of ``ChatCompletionTokenLogprob`` (``token``, ``logprob``, ``bytes``,
  ``top_logprobs``); ``finish_reason`` is stop, length, tool_calls, content_filter or function_call.
* "The request input object" (``BatchRequestInput``; .../api-reference/batch/request-input): ``custom_id``
  (unique within a batch), ``method`` POST, ``url`` /v1/chat/completions, ``body`` (the request: ``model``,
  ``messages``, ``logprobs``, ``top_logprobs``).
* "The request output object" (``BatchRequestOutput``; .../api-reference/batch/request-output), the line of
  a Batch's output file and of its error file: ``id``, ``custom_id``, ``response`` (null, or ``status_code``,
  ``request_id`` and ``body``: the chat completion, or ``{"error": {message, type, param, code}}`` when the
  status is not 2xx) and ``error`` (null, or ``{code, message}`` for a request that failed without a response).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from teachercache.errors import TeachercacheError
from teachercache.interop.logprobs import jsonl_records

FAILED, REFUSAL, TOOL_CALL = "failed request", "refusal", "tool call"
CONTENT_FILTER, EMPTY, UNKNOWN_ID, UNMAPPED = "content filter", "empty answer", "unknown custom_id", "unmapped token"
SKIP_REASONS = {   # why a line is skipped -> what the user can do about it (the --strict error says it)
    FAILED: "the request failed, so there is no answer: rerun it (a Batch lists its failed requests in its "
            "error file) and import the new output, or drop the line",
    REFUSAL: "the model refused, so there are no answer tokens (logprobs.content is null): drop the line",
    TOOL_CALL: "the answer is a tool call, whose arguments get no log-probs: request without tools (or "
               "tool_choice: none), or drop the line",
    CONTENT_FILTER: "the content filter omitted (part of) the answer: drop the line",
    EMPTY: "the answer has no tokens: drop the line",
    UNKNOWN_ID: "give as --requests the Batch input file this output file came from",
    UNMAPPED: "the API's tokenizer is not --tokenizer's: give the matching --tokenizer",
}


class ImportApiError(TeachercacheError):
    """An API log-probs file that cannot become a cache (shape, tokenizer mismatch)."""


@dataclass(frozen=True)
class Answer:
    """A line whose answer can become a row (unless one of its chosen tokens does not map)."""

    where: str
    """The line, as "file:line"."""
    messages: list
    """The request's messages."""
    content: list
    """choices[0].logprobs.content: one ChatCompletionTokenLogprob per answer token."""
    content_at: str
    """Where ``content`` sits in the line, for error messages: "response.body.choices[0].logprobs.content"."""
    custom_id: str | None


@dataclass(frozen=True)
class Skip:
    """A line that cannot become a row: ``reason`` is a key of SKIP_REASONS, ``problem`` names the field."""

    where: str
    reason: str
    problem: str
    custom_id: str | None


def read_requests(path: Path) -> dict[str, tuple[str, list]]:
    """custom_id -> ("file:line", messages) of an OpenAI Batch input file (see the module docstring)."""
    if not path.is_file():
        raise ImportApiError(f"--requests {path}: no such file (give the Batch input file, the JSONL uploaded "
                             "to create the batch)")
    requests: dict[str, tuple[str, list]] = {}
    for where, rec in jsonl_records(path, ImportApiError):
        cid = rec.get("custom_id") if isinstance(rec, dict) else None
        if not isinstance(cid, str) or not cid:
            raise ImportApiError(f'{where}: field custom_id missing; a Batch input line is {{"custom_id": "...", '
                                 '"method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}')
        url = rec.get("url")
        if url is not None and not str(url).endswith("/chat/completions"):
            raise ImportApiError(f"{where}: field url is {url!r}; import-api reads chat completions: give the "
                                 "input file of a /v1/chat/completions batch")
        body = rec.get("body")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ImportApiError(f"{where}: field body.messages (the request's messages) missing or empty")
        if cid in requests:
            raise ImportApiError(f"{where}: custom_id {cid!r} is already used at {requests[cid][0]}; custom_ids "
                                 "are unique in a Batch input file, so the answer's request is ambiguous: remove "
                                 "or rename the duplicate")
        requests[cid] = (where, messages)
    if not requests:
        raise ImportApiError(f"--requests {path}: no requests")
    return requests


def iter_lines(path: Path, requests: dict[str, tuple[str, list]] | None) -> Iterator[Answer | Skip]:
    """Every non-blank line of ``path`` as an Answer or a Skip; a line of the wrong shape is an error.
    With ``requests`` (custom_id -> (where, messages)) every line is a Batch output line, joined on custom_id."""
    answered: dict[str, str] = {}   # custom_id -> "file:line" of its output line
    for where, rec in jsonl_records(path, ImportApiError):
        if not isinstance(rec, dict):
            raise ImportApiError(f"{where}: expected a JSON object with messages and response")
        cid = rec.get("custom_id") if isinstance(rec.get("custom_id"), str) else None
        if requests is not None:
            if cid is None:
                raise ImportApiError(f"{where}: field custom_id missing; with --requests every line must be a "
                                     'Batch output line: {"id": ..., "custom_id": ..., "response": ..., "error": ...}')
            if cid in answered:
                raise ImportApiError(f"{where}: custom_id {cid!r} is already answered at {answered[cid]}; a Batch "
                                     "output file has one line per request: remove the duplicate")
            answered[cid] = where
        if (failure := _batch_failure(rec)) is not None:
            yield Skip(where, FAILED, failure, cid)
            continue
        if requests is None:
            messages = _inline_messages(rec, where)
        elif cid in requests:
            messages = requests[cid][1]
        else:
            yield Skip(where, UNKNOWN_ID, f"field custom_id {cid!r} names no request of --requests", cid)
            continue
        response = rec.get("response")
        if isinstance(response, dict) and isinstance(response.get("body"), dict):
            yield _answer(where, messages, response["body"], "response.body", cid)
        else:
            yield _answer(where, messages, response, "response", cid)


def _batch_failure(rec: dict) -> str | None:
    """What went wrong, for a line of a failed request ("The request output object"); None otherwise."""
    error, response = rec.get("error"), rec.get("response")
    if error is not None:
        return f"field error is set ({_error_text(error)})"
    if isinstance(response, dict) and "status_code" in response:
        code = response["status_code"]
        if not (isinstance(code, int) and 200 <= code < 300):
            body = response.get("body")
            detail = body.get("error") if isinstance(body, dict) else None
            return f"field response.status_code is {code} ({_error_text(detail) if detail else 'no error body'})"
    if "custom_id" in rec and "response" in rec and response is None:
        return "fields response and error are both null"
    return None


def _error_text(error) -> str:
    """``code: message`` of an API error object ({code, message} or {message, type, param, code})."""
    if isinstance(error, dict):
        text = f"{error.get('code') or error.get('type') or 'error'}: {error.get('message', '')}"
    else:
        text = str(error)
    return text if len(text) <= 200 else text[:197] + "..."


def _inline_messages(rec: dict, where: str) -> list:
    """The request's messages of an inline line: messages, request.messages or request.body.messages."""
    request = rec.get("request") if isinstance(rec.get("request"), dict) else {}
    body = request.get("body") if isinstance(request.get("body"), dict) else {}
    messages = rec.get("messages") or request.get("messages") or body.get("messages")
    if isinstance(messages, list) and messages:
        return messages
    if "custom_id" in rec and "response" in rec:
        raise ImportApiError(f"{where}: field messages missing: this is a Batch output line (custom_id "
                             f"{rec['custom_id']!r}), which holds only the answer; give the batch's input file "
                             "too: --requests batch_input.jsonl")
    raise ImportApiError(f"{where}: field messages (the request's messages) missing or empty")


def _answer(where: str, messages: list, completion, prefix: str, cid: str | None) -> Answer | Skip:
    """The answer of a chat completion (at ``prefix`` in the line), or why it is skipped."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ImportApiError(f"{where}: field {prefix}.choices[0].logprobs.content missing ({prefix} must be a "
                             "chat.completion, requested with logprobs: true, top_logprobs: 20)")
    choice, at = choices[0], f"{prefix}.choices[0]"
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    if message.get("refusal"):
        return Skip(where, REFUSAL, f"field {at}.message.refusal is set ({_error_text(message['refusal'])})", cid)
    for name in ("tool_calls", "function_call"):
        if message.get(name):
            return Skip(where, TOOL_CALL, f"field {at}.message.{name} is set", cid)
    if choice.get("finish_reason") == "content_filter":
        return Skip(where, CONTENT_FILTER, f"field {at}.finish_reason is 'content_filter'", cid)
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or "content" not in logprobs:
        raise ImportApiError(f"{where}: field {at}.logprobs.content missing (request logprobs: true, "
                             "top_logprobs: 20)")
    content = logprobs["content"]
    if content is None or content == []:
        return Skip(where, EMPTY, f"field {at}.logprobs.content is {json.dumps(content)}", cid)
    if not isinstance(content, list):
        raise ImportApiError(f"{where}: field {at}.logprobs.content is not a list of token log-probs")
    for i, entry in enumerate(content):
        ok = (isinstance(entry, dict) and isinstance(entry.get("token"), str)
              and isinstance(entry.get("logprob"), (int, float)) and isinstance(entry.get("top_logprobs"), list)
              and all(isinstance(t, dict) and isinstance(t.get("token"), str)
                      and isinstance(t.get("logprob"), (int, float)) for t in entry["top_logprobs"]))
        if not ok:
            raise ImportApiError(f"{where}: field {at}.logprobs.content[{i}] needs token, logprob and top_logprobs "
                                 "(each with token and logprob)")
    return Answer(where, messages, content, f"{at}.logprobs.content", cid)
