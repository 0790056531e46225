"""`teachercache import-api`: a cache from an OpenAI-compatible API's answer log-probs (top 20 at most).

Input: JSON Lines of a request's messages and the chat completion with ``logprobs.content`` (also the
OpenAI Batch shapes). ``TokenMap`` maps the API's tokens to the tokenizer's ids (byte-level BPE through
GPT-2's byte table, else the vocabulary), counting what does not map; above ``max_unmapped`` the import
is refused. The row is the messages in the tokenizer's chat template, then the answer's tokens; targets
on the answer tokens only. docs/blackbox.md (``teachercache import-api``) has the exact rules and sources.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from teachercache.errors import TeachercacheError
from teachercache.format import schema as S
from teachercache.format.cache import CacheWriter
from teachercache.format.manifest import (TOKENIZER_DIR, DataInfo, TargetSpec, TeacherInfo, TokenizerInfo,
                                          tokenizer_fingerprint)
from teachercache.format.shards import file_sha256
from teachercache.interop.logprobs import (ENTROPY_NOTE, ImportedRow, check_output, imported_batch, jsonl_records,
                                           prepare_output, read_tokenizer)


class ImportApiError(TeachercacheError):
    """An API log-probs file that cannot become a cache (shape, tokenizer mismatch)."""


@dataclass(frozen=True)
class ApiImportOptions:
    max_unmapped: float = 0.01
    """Refuse when more than this share of token occurrences (chosen + alternatives) do not map to ids."""
    teacher: str = "api"
    """Name of the model that answered (recorded in the manifest)."""
    rows_per_batch: int = 64
    """Records per Arrow record batch."""
    overwrite: bool = False
    """Replace whatever ``out`` holds."""


@dataclass
class ApiImportReport:
    records: int = 0
    rows: int = 0
    tokens: int = 0
    """Token occurrences seen: chosen tokens plus their top alternatives."""
    unmapped: int = 0
    unmapped_tokens: Counter = field(default_factory=Counter)
    """token string -> occurrences that did not map."""
    skipped_records: int = 0
    """Records whose chosen answer tokens did not all map."""
    mapping: str = ""

    def lines(self) -> list[str]:
        share = self.unmapped / max(self.tokens, 1)
        out = [f"{self.records} records -> {self.rows} rows; token mapping {self.mapping}: {self.unmapped} of "
               f"{self.tokens} token occurrences did not map ({share:.2%})"]
        if self.unmapped:
            out.append(f"  unmapped, most frequent: {self.examples()}")
        if self.skipped_records:
            out.append(f"  {self.skipped_records} records skipped (a chosen answer token did not map)")
        return out

    def examples(self, n: int = 10) -> str:
        return ", ".join(f"{t!r} x{c}" for t, c in self.unmapped_tokens.most_common(n))


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


def _records(path: Path) -> Iterator[tuple[str, list, list]]:
    """("file:line", request messages, logprobs.content) of every non-empty line, checked for shape."""
    for where, rec in jsonl_records(path, ImportApiError):
        if not isinstance(rec, dict):
            raise ImportApiError(f"{where}: expected a JSON object with messages and response")
        request = rec.get("request") if isinstance(rec.get("request"), dict) else {}
        messages = rec.get("messages") or request.get("messages") or (request.get("body") or {}).get("messages")
        response = rec.get("response")
        if isinstance(response, dict) and isinstance(response.get("body"), dict):
            response = response["body"]
        if not isinstance(messages, list) or not messages:
            raise ImportApiError(f"{where}: field messages (the request's messages) missing or empty")
        try:
            content = response["choices"][0]["logprobs"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ImportApiError(f"{where}: field response.choices[0].logprobs.content missing (request "
                                 "logprobs: true, top_logprobs: 20)") from None
        if not isinstance(content, list) or not content:
            raise ImportApiError(f"{where}: response.choices[0].logprobs.content is empty")
        for i, entry in enumerate(content):
            ok = (isinstance(entry, dict) and isinstance(entry.get("token"), str)
                  and isinstance(entry.get("logprob"), (int, float)) and isinstance(entry.get("top_logprobs"), list)
                  and all(isinstance(t, dict) and isinstance(t.get("token"), str)
                          and isinstance(t.get("logprob"), (int, float)) for t in entry["top_logprobs"]))
            if not ok:
                raise ImportApiError(f"{where}: logprobs.content[{i}] needs token, logprob and top_logprobs "
                                     "(each with token and logprob)")
        yield where, messages, content


def _map_record(content: list, tmap: TokenMap, report: ApiImportReport):
    """(chosen ids or None if one did not map, [(ids, logprobs)] per position, labels), counting tokens."""
    chosen, targets, labels, ok = [], [], [], True
    for entry in content:
        tid = tmap(entry["token"], entry.get("bytes"))
        report.tokens += 1
        if tid is None:
            report.unmapped += 1
            report.unmapped_tokens[entry["token"]] += 1
            ok = False
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
    return (chosen if ok else None), targets, labels


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


def import_api(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
               options: ApiImportOptions = ApiImportOptions()):
    """Write the cache ``out`` from the API log-probs JSONL ``path``; returns (Manifest, ApiImportReport)."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise ImportApiError(f"{path}: no such file (give the JSONL of API requests and responses)")
    check_output(out, options.overwrite, ImportApiError)
    tok = read_tokenizer(tokenizer_dir, ImportApiError)
    if not getattr(tok, "chat_template", None):
        raise ImportApiError(f"{tokenizer_dir}: the tokenizer has no chat_template, needed to render the request's "
                             "messages; save a copy with tokenizer.chat_template set (docs/blackbox.md)")
    tmap, V = TokenMap(tok), len(tok)
    report = ApiImportReport(mapping=tmap.mapping)
    k = 0
    for _, _, content in _records(path):   # pass 1: count what maps
        report.records += 1
        _map_record(content, tmap, report)
        k = max(k, max(len(e["top_logprobs"]) for e in content))
    if report.records == 0:
        raise ImportApiError(f"{path}: no records")
    if k == 0:
        raise ImportApiError(f"{path}: no top_logprobs anywhere (request top_logprobs: 20)")
    if report.unmapped > options.max_unmapped * report.tokens:
        raise ImportApiError(f"{path}: {report.unmapped} of {report.tokens} token occurrences "
                             f"({report.unmapped / report.tokens:.2%}) are not in the vocabulary of {tokenizer_dir} "
                             f"({tmap.mapping}), more than --max-unmapped {options.max_unmapped:.2%}; e.g. "
                             f"{report.examples(5)}. The API's tokenizer is not this one: give the matching "
                             "--tokenizer (or raise --max-unmapped)")
    prepare_output(out, options.overwrite, ImportApiError)
    tok.save_pretrained(out / TOKENIZER_DIR)
    counting = ApiImportReport()   # pass 2 recounts into a throwaway report
    rows, longest = [], 0
    with CacheWriter(out, S.Layout(vocab_size=V)) as writer:
        for where, messages, content in _records(path):
            chosen, targets, labels = _map_record(content, tmap, counting)
            if chosen is None:
                report.skipped_records += 1
                continue
            prompt = _prompt_ids(tok, messages, where)
            rows.append(_row(prompt, chosen, targets, labels))
            longest = max(longest, len(prompt) + len(chosen))
            report.rows += 1
            if len(rows) == options.rows_per_batch:
                writer.write(imported_batch(rows, V))
                rows = []
        if rows:
            writer.write(imported_batch(rows, V))
        if report.rows == 0:
            raise ImportApiError(f"{path}: no record could be imported ({report.skipped_records} skipped)")
        manifest = writer.finish(
            targets=TargetSpec(kind="topk", k=k, temperature=1.0),
            teacher=TeacherInfo(name_or_path=options.teacher, config_sha256="", dtype="unknown", output_size=V),
            tokenizer=TokenizerInfo(fingerprint=tokenizer_fingerprint(tok), vocab_size=V),
            data=DataInfo(sources=[str(path)], fingerprint=file_sha256(path), seq_len=longest, packing="document",
                          documents_read=report.records, documents_used=report.rows,
                          documents_skipped={"unmapped token": report.skipped_records} if report.skipped_records else {}),
            extra={"imported_from": "openai chat completions logprobs", "entropy": ENTROPY_NOTE,
                   "token_mapping": tmap.mapping, "unmapped_tokens": report.unmapped,
                   "token_occurrences": report.tokens, "unmapped_examples": report.examples()})
    return manifest, report
