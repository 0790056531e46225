"""`teachercache import-api`: a cache from an OpenAI-compatible API's answer log-probs (top 20 at most).

Input: JSON Lines, one request a line, in one of two layouts (docs/blackbox.md, ``teachercache import-api``,
has an example line of each):

* inline: ``{"messages": [...], "response": <chat.completion>}``; the messages may also sit at
  ``request.messages`` or ``request.body.messages``, the completion at ``response.body``;
* an OpenAI Batch **output** file with its Batch **input** file (``requests``, ``--requests``): the input
  lines hold the messages, the output lines the answers, joined on ``custom_id`` (not on line order).

The shapes of the lines (OpenAI's chat completion, Batch request input and output objects) and the skip
reasons are described and read in teachercache.interop.api_lines.

A line that cannot become a row is skipped and counted by reason (``SKIP_REASONS``, reported by
``ApiImportReport.summary``): a failed Batch request, a refusal, a tool call, a content-filtered or empty
answer, an output ``custom_id`` with no request, a chosen answer token that does not map. With
``ApiImportOptions.strict`` any of them (and any request without an output line) is an error instead. A
line of the wrong shape (not JSON, no messages, no ``logprobs`` requested) is always an error.

``TokenMap`` maps the API's tokens to the tokenizer's ids (byte-level BPE through GPT-2's byte table, else
the vocabulary), counting what does not map; above ``max_unmapped`` the import is refused. The row is the
messages in the tokenizer's chat template, then the answer's tokens; targets on the answer tokens only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from teachercache.format import schema as S
from teachercache.format.cache import CacheWriter
from teachercache.format.manifest import (TOKENIZER_DIR, DataInfo, TargetSpec, TeacherInfo, TokenizerInfo,
                                          tokenizer_fingerprint)
from teachercache.format.shards import file_sha256
from teachercache.interop.api_lines import (SKIP_REASONS, UNKNOWN_ID, UNMAPPED, Answer, ImportApiError, Skip,
                                            iter_lines, read_requests)
from teachercache.interop.logprobs import (ENTROPY_NOTE, ImportedRow, check_output, imported_batch, prepare_output,
                                           read_tokenizer)

ID_EXAMPLES = 5
"""custom_ids named in the summary (of output lines without a request, of requests without an output line)."""


@dataclass(frozen=True)
class ApiImportOptions:
    max_unmapped: float = 0.01
    """Refuse when more than this share of token occurrences (chosen + alternatives) do not map to ids."""
    strict: bool = False
    """Refuse the import when a line cannot become a row (failed request, refusal, tool call, empty or
    content-filtered answer, unknown custom_id, unmappable answer token) or a request has no output line,
    naming the first one; without it they are skipped and counted."""
    teacher: str = "api"
    """Name of the model that answered (recorded in the manifest)."""
    rows_per_batch: int = 64
    """Records per Arrow record batch."""
    overwrite: bool = False
    """Replace whatever ``out`` holds."""


@dataclass
class ApiImportReport:
    records: int = 0
    """Non-blank lines read: rows + skipped_records."""
    rows: int = 0
    tokens: int = 0
    """Token occurrences seen: chosen tokens plus their top alternatives."""
    unmapped: int = 0
    unmapped_tokens: Counter = field(default_factory=Counter)
    """token string -> occurrences that did not map."""
    skipped: Counter = field(default_factory=Counter)
    """reason (a key of SKIP_REASONS) -> lines skipped for it."""
    first_skipped: dict[str, str] = field(default_factory=dict)
    """reason -> "file:line" of the first line skipped for it."""
    unknown_ids: list[str] = field(default_factory=list)
    """custom_ids of output lines with no request in --requests (the first ID_EXAMPLES)."""
    unanswered: int = 0
    """Requests of --requests with no line in the output file."""
    unanswered_ids: list[str] = field(default_factory=list)
    """Their custom_ids (the first ID_EXAMPLES)."""
    mapping: str = ""

    @property
    def skipped_records(self) -> int:
        return sum(self.skipped.values())

    def skip(self, item: Skip) -> None:
        self.skipped[item.reason] += 1
        self.first_skipped.setdefault(item.reason, item.where)
        if item.reason == UNKNOWN_ID and len(self.unknown_ids) < ID_EXAMPLES:
            self.unknown_ids.append(item.custom_id)

    def summary(self) -> str:
        """One line: lines skipped per reason (with the first line of each), requests without an answer."""
        parts = []
        for reason in SKIP_REASONS:
            if n := self.skipped[reason]:
                ids = f"; ids {_names(self.unknown_ids, n)}" if reason == UNKNOWN_ID else ""
                parts.append(f"{reason} x{n} (first at {self.first_skipped[reason]}{ids})")
        out = f"skipped {self.skipped_records} of {self.records} records" + (": " + ", ".join(parts) if parts else "")
        if self.unanswered:
            out += (f"; requests of --requests with no output line: {self.unanswered} "
                    f"({_names(self.unanswered_ids, self.unanswered)})")
        return out

    def lines(self) -> list[str]:
        share = self.unmapped / max(self.tokens, 1)
        out = [f"{self.records} records -> {self.rows} rows; token mapping {self.mapping}: {self.unmapped} of "
               f"{self.tokens} token occurrences did not map ({share:.2%})"]
        if self.unmapped:
            out.append(f"  unmapped, most frequent: {self.examples()}")
        out.append(f"  {self.summary()}")
        return out

    def examples(self, n: int = 10) -> str:
        return ", ".join(f"{t!r} x{c}" for t, c in self.unmapped_tokens.most_common(n))


def _names(ids: list[str], total: int) -> str:
    """'a', 'b' and 3 more."""
    more = f" and {total - len(ids)} more" if total > len(ids) else ""
    return ", ".join(repr(i) for i in ids) + more


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies (e.g. 0x20 -> 'Ġ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TokenMap:
    """API token (string + bytes) -> id in a Hugging Face tokenizer's vocabulary (see the module docstring)."""

    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        self.byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
            spec.get("pre_tokenizer"))
        self.mapping = "byte-level BPE (GPT-2 byte-to-unicode)" if self.byte_level else "vocabulary lookup"
        self._table = bytes_to_unicode()

    def __call__(self, token: str, raw: list | None) -> int | None:
        data = bytes(raw) if isinstance(raw, list) else None
        if self.byte_level:
            if data is None:
                data = token.encode("utf-8")
            return self.vocab.get("".join(self._table[b] for b in data))
        for form in (token, token.replace(" ", "▁")):
            if form in self.vocab:
                return self.vocab[form]
        if data is not None and len(data) == 1:
            return self.vocab.get(f"<0x{data[0]:02X}>")
        return None


def _map_record(content: list, tmap: TokenMap, report: ApiImportReport):
    """(chosen ids, None where one did not map; [(ids, logprobs)] per position; labels), counting tokens."""
    chosen, targets, labels = [], [], []
    for entry in content:
        tid = tmap(entry["token"], entry.get("bytes"))
        report.tokens += 1
        if tid is None:
            report.unmapped += 1
            report.unmapped_tokens[entry["token"]] += 1
        chosen.append(tid)
        labels.append(float(entry["logprob"]))
        seen, pairs = set(), []
        for alt in entry["top_logprobs"]:
            aid = tmap(alt["token"], alt.get("bytes"))
            report.tokens += 1
            if aid is None:
                report.unmapped += 1
                report.unmapped_tokens[alt["token"]] += 1
            elif aid not in seen:
                seen.add(aid)
                pairs.append((aid, float(alt["logprob"])))
        pairs.sort(key=lambda p: (-p[1], p[0]))
        targets.append((np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.float64)))
    return chosen, targets, labels


def _prompt_ids(tok, messages: list, where: str) -> list[int]:
    try:
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    except Exception as e:  # jinja errors of a template that does not take these messages
        raise ImportApiError(f"{where}: the tokenizer's chat template cannot render the messages ({e})") from None
    return list(out["input_ids"] if isinstance(out, dict) else out)


def _row(prompt: list[int], answer: list[int], targets: list, labels: list[float]) -> ImportedRow:
    """The row of a record: prompt then answer tokens; position t predicts answer token t+1."""
    n = len(prompt) + len(answer)
    mask = np.zeros(n, bool)
    mask[len(prompt) - 1: n - 1] = True
    return ImportedRow(input_ids=prompt + answer, target_mask=mask, ids=[t[0] for t in targets],
                       logprobs=[t[1] for t in targets], labels=labels)


def _survey(path: Path, requests: dict | None, tmap: TokenMap, report: ApiImportReport) -> tuple[int, Skip | None]:
    """Pass 1: count lines, skips and token mapping into ``report``; (most top_logprobs of a position, first
    skipped line)."""
    k, first, seen = 0, None, set()
    for item in iter_lines(path, requests):
        report.records += 1
        seen.add(item.custom_id)
        if isinstance(item, Answer):
            chosen, _, _ = _map_record(item.content, tmap, report)
            k = max(k, max(len(e["top_logprobs"]) for e in item.content))
            if None in chosen:
                i = chosen.index(None)
                token = item.content[i]["token"]
                item = Skip(item.where, UNMAPPED, f"field {item.content_at}[{i}].token {token!r} is not in the "
                             f"vocabulary of --tokenizer ({tmap.mapping})", item.custom_id)
        if isinstance(item, Skip):
            report.skip(item)
            first = first or item
    if requests is not None:
        missing = [cid for cid in requests if cid not in seen]
        report.unanswered, report.unanswered_ids = len(missing), missing[:ID_EXAMPLES]
    return k, first


def _strict_refusal(first: Skip | None, report: ApiImportReport, path: Path, requests_path) -> ImportApiError | None:
    """The error --strict raises for the first skipped line (or for requests without an answer), else None."""
    if first is not None:
        counts = ", ".join(f"{reason} x{n}" for reason, n in report.skipped.items())
        return ImportApiError(f"{first.where}: {first.problem}; {SKIP_REASONS[first.reason]}. --strict refuses "
                              f"every line that cannot become a row (here {report.skipped_records} of "
                              f"{report.records}: {counts}); without --strict they are skipped and counted")
    if report.unanswered:
        return ImportApiError(f"--requests {requests_path}: requests with no line in {path}: {report.unanswered} "
                              f"({_names(report.unanswered_ids, report.unanswered)}); a Batch's failed requests are "
                              "in its error file: append its lines to the output file, or rerun those requests; "
                              "without --strict they are counted and left out")
    return None


def _fingerprint(path: Path, requests_path: Path | None) -> str:
    if requests_path is None:
        return file_sha256(path)
    return hashlib.sha256(f"{file_sha256(path)} {file_sha256(requests_path)}".encode()).hexdigest()


def import_api(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
               options: ApiImportOptions = ApiImportOptions(), requests: str | os.PathLike | None = None):
    """Write the cache ``out`` from the API log-probs JSONL ``path``; returns (Manifest, ApiImportReport).

    ``requests``: the OpenAI Batch input file when ``path`` is that batch's output file; each answer gets the
    messages of the request with its ``custom_id``. Rows follow the order of ``path``."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise ImportApiError(f"{path}: no such file (give the JSONL of API requests and responses)")
    requests_path = Path(requests) if requests is not None else None
    table = read_requests(requests_path) if requests_path is not None else None
    check_output(out, options.overwrite, ImportApiError)
    tok = read_tokenizer(tokenizer_dir, ImportApiError)
    if not getattr(tok, "chat_template", None):
        raise ImportApiError(f"{tokenizer_dir}: the tokenizer has no chat_template, needed to render the request's "
                             "messages; save a copy with tokenizer.chat_template set (docs/blackbox.md)")
    tmap, V = TokenMap(tok), len(tok)
    report = ApiImportReport(mapping=tmap.mapping)
    k, first_skip = _survey(path, table, tmap, report)   # pass 1: count what maps and what is skipped
    if report.records == 0:
        raise ImportApiError(f"{path}: no records")
    if report.unmapped > options.max_unmapped * report.tokens:
        raise ImportApiError(f"{path}: {report.unmapped} of {report.tokens} token occurrences "
                             f"({report.unmapped / report.tokens:.2%}) are not in the vocabulary of {tokenizer_dir} "
                             f"({tmap.mapping}), more than --max-unmapped {options.max_unmapped:.2%}; e.g. "
                             f"{report.examples(5)}. The API's tokenizer is not this one: give the matching "
                             "--tokenizer (or raise --max-unmapped)")
    if options.strict and (error := _strict_refusal(first_skip, report, path, requests_path)):
        raise error
    if report.skipped_records == report.records:
        raise ImportApiError(f"{path}: no record can be imported ({report.summary()})")
    if k == 0:
        raise ImportApiError(f"{path}: no top_logprobs anywhere (request top_logprobs: 20)")
    prepare_output(out, options.overwrite, ImportApiError)
    tok.save_pretrained(out / TOKENIZER_DIR)
    with CacheWriter(out, S.Layout(vocab_size=V)) as writer:
        longest = _write_rows(writer, path, table, tok, tmap, options.rows_per_batch, report)
        extra = {"requests_without_output": report.unanswered} if table is not None else {}
        manifest = writer.finish(
            targets=TargetSpec(kind="topk", k=k, temperature=1.0),
            teacher=TeacherInfo(name_or_path=options.teacher, config_sha256="", dtype="unknown", output_size=V),
            tokenizer=TokenizerInfo(fingerprint=tokenizer_fingerprint(tok), vocab_size=V),
            data=DataInfo(sources=[str(p) for p in (path, requests_path) if p is not None],
                          fingerprint=_fingerprint(path, requests_path), seq_len=longest, packing="document",
                          documents_read=report.records, documents_used=report.rows,
                          documents_skipped=dict(report.skipped)),
            extra={"imported_from": "openai chat completions logprobs", "entropy": ENTROPY_NOTE,
                   "token_mapping": tmap.mapping, "unmapped_tokens": report.unmapped,
                   "token_occurrences": report.tokens, "unmapped_examples": report.examples(), **extra})
    return manifest, report


def _write_rows(writer: CacheWriter, path: Path, requests: dict | None, tok, tmap: TokenMap, rows_per_batch: int,
                report: ApiImportReport) -> int:
    """Pass 2: write a row per usable answer (skips were counted in pass 1); returns the longest row's length."""
    counting = ApiImportReport()   # pass 2 recounts tokens into a throwaway report
    rows, longest, V = [], 0, len(tok)
    for item in iter_lines(path, requests):
        if isinstance(item, Skip):
            continue
        chosen, targets, labels = _map_record(item.content, tmap, counting)
        if None in chosen:
            continue
        prompt = _prompt_ids(tok, item.messages, item.where)
        rows.append(_row(prompt, chosen, targets, labels))
        longest = max(longest, len(prompt) + len(chosen))
        report.rows += 1
        if len(rows) == rows_per_batch:
            writer.write(imported_batch(rows, V))
            rows = []
    if rows:
        writer.write(imported_batch(rows, V))
    return longest
