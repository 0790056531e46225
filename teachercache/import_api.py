"""`teachercache import-api`: a cache from an OpenAI-compatible API's answer log-probs (top 20 at most).

Input: JSON Lines, one request + response per line::

    {"messages": [{"role": "user", "content": "..."}, ...],          # the request's messages
     "response": {"choices": [{"message": {"role": "assistant", "content": "..."},
                               "logprobs": {"content": [
                                   {"token": "Hello", "logprob": -0.31, "bytes": [72, 101, 108, 108, 111],
                                    "top_logprobs": [{"token": "Hello", "logprob": -0.31, "bytes": [...]},
                                                     {"token": "Hi", "logprob": -1.46, "bytes": [72, 105]}]},
                                   ...]}}]}}

The messages may also be under ``request.messages`` or ``request.body.messages`` (an OpenAI Batch input
line), and the response under ``response.body`` (an OpenAI Batch output line). The ``logprobs.content``
shape is the chat completion object's, as the OpenAI API reference documents it
(https://platform.openai.com/docs/api-reference/chat/object, schema ``ChatCompletionTokenLogprob``; mirrored
e.g. at https://docs.rs/crate/openai-client-base/0.12.0/source/docs/ChatCompletionTokenLogprob.md): each
element has ``token`` (string), ``logprob`` (the token's log-probability; ``-9999.0`` when it is not
within the top 20), ``bytes`` (the token's UTF-8 bytes as a list of integers, or null) and
``top_logprobs`` (the most likely tokens at this position with ``token``, ``logprob``, ``bytes``; up to
the requested ``top_logprobs`` <= 20, "in rare cases" fewer). Request them with ``logprobs: true,
top_logprobs: 20``.

Mapping tokens to ids (``TokenMap``): for a byte-level BPE tokenizer (GPT-2/Llama-3/Qwen style: its
decoder is ``ByteLevel``) a token's bytes (``bytes``, else the UTF-8 of ``token``) are spelled with the
GPT-2 byte-to-unicode table and looked up in the tokenizer's vocabulary (so ``" Hello"`` -> ``"ĠHello"``);
for other tokenizers the token string is looked up as is, then with spaces as ``▁`` (SentencePiece), then a
single byte as ``<0xNN>``. Whatever is not in the vocabulary does not map: such tokens are counted over
every occurrence (the chosen tokens and all their alternatives) and reported with examples; when more than
``max_unmapped`` (default 1%) of them do not map the import is refused (ImportApiError), since the API's
tokenizer is then not the student's. Below the threshold an unmapped alternative is left out of its
position's stored ids (its probability goes to the rest mass), and a record whose *chosen* token does not
map is skipped (counted): its row cannot be spelled in the tokenizer's ids.

The row: the request's messages rendered with the tokenizer's chat template and its generation prompt
(the tokenizer needs a chat_template), then the answer's tokens as the API gave them (mapped; not
re-tokenized; no end-of-turn token is appended). Only positions whose next token is an answer token carry
a target (prompt tokens are in the row with target_mask False): the mapped top-k ids with their log-probs,
the label log-prob from the chosen token's ``logprob``, rest mass 1 - sum(exp(stored)), and an entropy
estimate as for import-vllm (manifest ``extra.entropy``). One record is one row (packing ``document``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import schema as S
from .batch import RowBatch
from .cache import CacheWriter
from .errors import TeachercacheError
from .manifest import TOKENIZER_DIR, DataInfo, TargetSpec, TeacherInfo, TokenizerInfo, tokenizer_fingerprint
from .vllm import ENTROPY_NOTE, _file_sha256


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


def _records(path: Path) -> Iterator[tuple[int, list, list]]:
    """(line number, request messages, logprobs.content) of every non-empty line, checked for shape."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImportApiError(f"{where}: not valid JSON ({e})") from None
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
            yield line_no, messages, content


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


def _batch(rows: list, V: int) -> RowBatch:
    """rows: (prompt ids, answer ids, [(ids, logprobs)] per answer token, labels)."""
    input_ids, mask, t_ids, t_lps, labels, lengths = [], [], [], [], [], []
    for prompt, answer, targets, labs in rows:
        n = len(prompt) + len(answer)
        m = np.zeros(n, bool)
        m[len(prompt) - 1: n - 1] = True   # position t predicts answer token t+1
        input_ids += prompt + answer
        mask.append(m)
        t_ids += [t[0] for t in targets]
        t_lps += [t[1] for t in targets]
        labels += labs
        lengths.append(n)
    sizes = np.array([len(x) for x in t_ids], np.int64)
    flat = np.concatenate(t_lps) if t_lps else np.zeros(0)
    p = np.exp(flat)
    pos = np.repeat(np.arange(len(sizes)), sizes)
    rest = np.clip(1.0 - np.bincount(pos, p, minlength=len(sizes)), 0.0, 1.0)
    plogp = np.bincount(pos, np.where(p > 0, p * flat, 0.0), minlength=len(sizes))
    tail = np.maximum(V - sizes, 1)
    entropy = -plogp - np.where(rest > 0, rest * np.log(np.maximum(rest, 1e-300) / tail), 0.0)
    return RowBatch(row_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    input_ids=np.asarray(input_ids, np.int32), target_mask=np.concatenate(mask),
                    target_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                    target_ids=np.concatenate(t_ids).astype(np.int32), target_logprobs=flat.astype(np.float32),
                    label_logprob=np.asarray(labels, np.float32), rest_mass=rest.astype(np.float32),
                    entropy=np.maximum(entropy, 0.0).astype(np.float32))


def import_api(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
               options: ApiImportOptions = ApiImportOptions()):
    """Write the cache ``out`` from the API log-probs JSONL ``path``; returns (Manifest, ApiImportReport)."""
    from transformers import AutoTokenizer

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise ImportApiError(f"{path}: no such file (give the JSONL of API requests and responses)")
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise ImportApiError(f"{out}: not empty; add --overwrite to replace it")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
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
    if out.exists() and options.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / TOKENIZER_DIR)
    counting = ApiImportReport()   # pass 2 recounts into a throwaway report
    rows, longest = [], 0
    with CacheWriter(out, S.Layout(vocab_size=V)) as writer:
        for line_no, messages, content in _records(path):
            chosen, targets, labels = _map_record(content, tmap, counting)
            if chosen is None:
                report.skipped_records += 1
                continue
            prompt = _prompt_ids(tok, messages, f"{path}:{line_no}")
            rows.append((prompt, chosen, targets, labels))
            longest = max(longest, len(prompt) + len(chosen))
            report.rows += 1
            if len(rows) == options.rows_per_batch:
                writer.write(_batch(rows, V))
                rows = []
        if rows:
            writer.write(_batch(rows, V))
        if report.rows == 0:
            raise ImportApiError(f"{path}: no record could be imported ({report.skipped_records} skipped)")
        manifest = writer.finish(
            targets=TargetSpec(kind="topk", k=k, temperature=1.0),
            teacher=TeacherInfo(name_or_path=options.teacher, config_sha256="", dtype="unknown", output_size=V),
            tokenizer=TokenizerInfo(fingerprint=tokenizer_fingerprint(tok), vocab_size=V),
            data=DataInfo(sources=[str(path)], fingerprint=_file_sha256(path), seq_len=longest, packing="document",
                          documents_read=report.records, documents_used=report.rows,
                          documents_skipped={"unmapped token": report.skipped_records} if report.skipped_records else {}),
            extra={"imported_from": "openai chat completions logprobs", "entropy": ENTROPY_NOTE,
                   "token_mapping": tmap.mapping, "unmapped_tokens": report.unmapped,
                   "token_occurrences": report.tokens, "unmapped_examples": report.examples()})
    return manifest, report
