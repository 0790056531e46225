"""`teachercache import-vllm`: a cache from vLLM's prompt log-probs, for teachers served by vLLM.

vLLM scores a prompt when the request sets ``prompt_logprobs=k``: a list with one element per prompt
token, element 0 null, element i the k most likely ids of token i given tokens < i plus token i itself, as
{id: {logprob, rank, decoded_token}} (``Logprob`` in vllm/logprobs.py; JSON makes the int ids strings).
Element i becomes the target of position i-1: the k best ids, the label log-prob, rest mass and entropy
estimated (teachercache.interop.logprobs). One prompt is one row.

The file is JSON Lines, one JSON array of records, or one (pretty-printed) JSON object. Each record's shape
is detected on its own (classes from vllm-project/vllm, read at commit 002032ee):

- completions response, ``CompletionResponse`` (vllm/entrypoints/openai/completion/protocol.py; older
  releases: vllm/entrypoints/openai/protocol.py): ``prompt_logprobs`` and ``prompt_token_ids`` are fields
  of each ``choices[i]`` (``CompletionResponseChoice``). Every choice is read; choices of one response with
  the same prompt_token_ids and prompt_logprobs (the n > 1 samples of one prompt) are stored once, the
  others counted in the manifest's ``extra.repeated_choices``.
- chat completions response, ``ChatCompletionResponse`` (.../chat_completion/protocol.py): both fields at
  the top level, and the rendered prompt in ``prompt_text`` when the request set return_prompt_text.
- ``LLM.generate``'s ``RequestOutput`` (vllm/outputs.py) written as a dict of its attributes:
  ``prompt``, ``prompt_token_ids``, ``prompt_logprobs`` (a list of {id: Logprob fields}, or a
  ``FlatLogprobs`` as dataclasses.asdict writes it), ``outputs``...
- ``vllm run-batch``'s output file, one ``BatchRequestOutput`` per line (vllm/entrypoints/openai/run_batch.py:
  ``id``, ``custom_id``, ``response`` {``status_code``, ``request_id``, ``body``}, ``error``): the ``body``
  (a chat completions or completions response, as above) is read; a failed request is refused, named.
- the flat ``{"prompt_token_ids": [...], "prompt_logprobs": [...]}`` this importer first read.

vLLM's servers fill ``prompt_token_ids`` only when the request sets ``return_token_ids: true``
(request_output_to_completion_response in .../completion/serving.py and its chat counterpart). Without it,
the record's prompt text (``prompt``, e.g. RequestOutput's or one the user added; else the chat response's
``prompt_text``) is tokenized with --tokenizer and used only when it gives one token per prompt_logprobs
element and each token i >= 1 is among the ids scored at i; otherwise the record is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from teachercache.errors import TeachercacheError
from teachercache.format import schema as S
from teachercache.format.cache import CacheWriter
from teachercache.format.manifest import (TOKENIZER_DIR, DataInfo, TargetSpec, TeacherInfo, TokenizerInfo,
                                          tokenizer_fingerprint)
from teachercache.format.shards import file_sha256
from teachercache.interop.logprobs import (ENTROPY_NOTE, ImportedRow, imported_batch, json_records, prepare_output,
                                           read_tokenizer)


REPEATS_KEY = "repeated_choices"
"""Manifest ``extra`` key: completions choices not stored because an earlier choice of the same response had
the same prompt (its n > 1 samples share one prompt_logprobs)."""


class VllmImportError(TeachercacheError):
    """A vLLM prompt-logprobs file that cannot become a cache."""


@dataclass(frozen=True)
class VllmImportOptions:
    k: int | None = None
    """Ids to store per position; None: the smallest number of entries any position of the file has."""
    teacher: str = "vllm"
    """Name of the teacher that produced the log-probs (recorded in the manifest)."""
    temperature: float = 1.0
    """Temperature the log-probs were computed at (recorded in the manifest)."""
    rows_per_batch: int = 64
    """Prompts per Arrow record batch."""
    overwrite: bool = False
    """Replace whatever ``out`` holds."""


def _prompts(where: str, rec) -> Iterator[tuple[str, object, object, object]]:
    """(where, prompt_token_ids, prompt_logprobs, prompt text) of each prompt in one record, found by shape:
    top-level ``prompt_logprobs`` (chat completions response, RequestOutput, flat), else one per entry of
    ``choices`` (completions response). Values are as the file has them, checked later."""
    if not isinstance(rec, dict):
        raise VllmImportError(f"{where}: expected a JSON object (a vLLM response or RequestOutput), "
                              f"not {type(rec).__name__}")
    if "custom_id" in rec and "response" in rec:   # a line of `vllm run-batch`'s output file
        rec, where = _batch_body(rec, where), f"{where} response.body"
    text = rec.get("prompt") if isinstance(rec.get("prompt"), str) else rec.get("prompt_text")
    choices = rec.get("choices")
    if rec.get("prompt_logprobs") is not None:
        yield where, rec.get("prompt_token_ids"), rec["prompt_logprobs"], text
    elif isinstance(choices, list) and (rec.get("object") == "text_completion" or
                                        any(isinstance(c, dict) and "prompt_logprobs" in c for c in choices)):
        if not choices:
            raise VllmImportError(f"{where}: a completions response with no choices (the request failed?)")
        for i, choice in enumerate(choices):
            at = f"{where} choices[{i}]"
            if not isinstance(choice, dict) or choice.get("prompt_logprobs") is None:
                raise VllmImportError(f"{at}: prompt_logprobs is missing or null; send prompt_logprobs=k "
                                      "(and return_token_ids: true) with the completions request")
            yield at, choice.get("prompt_token_ids"), choice["prompt_logprobs"], text
    else:
        raise VllmImportError(f"{where}: no prompt_logprobs, neither at the top level (chat completions "
                              "response, RequestOutput) nor in choices[i] (completions response); send "
                              "prompt_logprobs=k and return_token_ids: true with the request")


def _batch_body(rec: dict, where: str) -> dict:
    """The response inside a ``BatchRequestOutput`` line (``vllm run-batch``'s output file: id, custom_id,
    response {status_code, request_id, body}, error); a failed request is refused, naming it."""
    response, error = rec.get("response"), rec.get("error")
    code = response.get("status_code", 200) if isinstance(response, dict) else None
    body = response.get("body") if isinstance(response, dict) else None
    if error is not None or not isinstance(code, int) or not 200 <= code < 300 or not isinstance(body, dict):
        why = f"error {json.dumps(error)[:200]}" if error is not None else f"response {json.dumps(response)[:200]}"
        raise VllmImportError(f"{where}: custom_id {rec.get('custom_id')!r}: the batch request failed ({why}); "
                              "rerun it, or drop the line from the file")
    return body


_FLAT_FIELDS = ("start_indices", "end_indices", "token_ids", "logprobs")


def _unflatten(lps, where: str):
    """prompt_logprobs as a list of {id: {logprob, rank, decoded_token}} (or null). vLLM's FlatLogprobs
    (vllm/logprobs.py), as dataclasses.asdict writes it, holds the same as parallel lists plus each
    position's [start, end) range in them; it becomes that list here (an empty range: null)."""
    if not isinstance(lps, dict):
        return lps
    if not all(isinstance(lps.get(f), list) for f in _FLAT_FIELDS):
        raise VllmImportError(f"{where}: prompt_logprobs is an object without FlatLogprobs' lists "
                              f"{', '.join(_FLAT_FIELDS)}; give vLLM's prompt_logprobs as it wrote them")
    n = len(lps["token_ids"])
    ranks, decoded = lps.get("ranks") or [None] * n, lps.get("decoded_tokens") or [None] * n
    try:
        return [{str(lps["token_ids"][j]): {"logprob": lps["logprobs"][j], "rank": ranks[j],
                                            "decoded_token": decoded[j]} for j in range(a, b)} or None
                for a, b in zip(lps["start_indices"], lps["end_indices"], strict=True)]
    except (IndexError, TypeError, ValueError):
        raise VllmImportError(f"{where}: prompt_logprobs (FlatLogprobs) has start/end indices outside its "
                              "lists, or lists of different lengths; was the file edited?") from None


def _first_disagreement(ids: list[int], lps: list) -> int | None:
    """The first position i >= 1 whose token ids[i] is not among the ids vLLM scored at prompt_logprobs[i]."""
    return next((i for i in range(1, len(ids)) if not isinstance(lps[i], dict) or str(ids[i]) not in lps[i]),
                None)


def _ids_from_text(text: str, lps: list, tok, where: str) -> list[int]:
    """prompt_token_ids recovered from the prompt text: the --tokenizer's tokens (with its special tokens,
    as vLLM's completions and LLM.generate add them, or without, as its chat endpoint does), accepted only
    when there is one per prompt_logprobs element and each token i >= 1 is among the ids scored at i."""
    fix = "set return_token_ids: true in the request so that vLLM writes prompt_token_ids"
    candidates = [tok.encode(text, add_special_tokens=True)]
    if (plain := tok.encode(text, add_special_tokens=False)) != candidates[0]:
        candidates.append(plain)
    same_length = [c for c in candidates if len(c) == len(lps)]
    if not same_length:
        counts = " or ".join(str(len(c)) for c in candidates)
        raise VllmImportError(f"{where}: prompt_token_ids is missing, and the prompt text tokenizes to {counts} "
                              f"tokens with --tokenizer, not the {len(lps)} that prompt_logprobs has; {fix}")
    for ids in same_length:
        if _first_disagreement(ids, lps) is None:
            return ids
    ids = same_length[0]
    i = _first_disagreement(ids, lps)
    scored = sorted(int(t) for t in lps[i]) if isinstance(lps[i], dict) else []
    raise VllmImportError(f"{where}: prompt_token_ids is missing, and the prompt text tokenized with --tokenizer "
                          f"disagrees with prompt_logprobs at position {i}: its token {ids[i]} "
                          f"({tok.decode([ids[i]])!r}) is not among the ids vLLM scored there {scored}; {fix}")


def _checked(where: str, ids, lps, text, tok) -> tuple[list[int], list]:
    """(prompt_token_ids, prompt_logprobs) of one prompt, checked for shape; ids recovered from the text when
    the file has none."""
    lps = _unflatten(lps, where)
    if not isinstance(lps, list):
        raise VllmImportError(f"{where}: prompt_logprobs must be a list (one element per prompt token); "
                              "run vLLM with prompt_logprobs=k")
    if ids is None:
        if not isinstance(text, str):
            raise VllmImportError(f"{where}: prompt_token_ids is missing (vLLM's servers write it only when the "
                                  "request asks); set return_token_ids: true in the request, or add the prompt's "
                                  "text to the record as \"prompt\" to have it tokenized with --tokenizer")
        ids = _ids_from_text(text, lps, tok, where)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise VllmImportError(f"{where}: prompt_token_ids must be a list of integer token ids")
    if len(ids) != len(lps) or len(ids) < 2:
        raise VllmImportError(f"{where}: prompt_logprobs has {len(lps)} elements for {len(ids)} prompt "
                              "tokens; vLLM gives one per token (the first null) and a row needs 2 tokens")
    return ids, lps


def _records(path: Path, tok) -> Iterator[tuple[str, list[int], list, bool]]:
    """(where, prompt_token_ids, prompt_logprobs, repeat) of every prompt of the file, checked for shape;
    ``repeat``: an earlier choice of the same response had the same tokens and log-probs (n > 1)."""
    for where, rec in json_records(path, VllmImportError):
        prompts, seen = list(_prompts(where, rec)), set()
        for at, ids, lps, text in prompts:
            ids, lps = _checked(at, ids, lps, text, tok)
            key = json.dumps([ids, lps], sort_keys=True) if len(prompts) > 1 else ""
            yield at, ids, lps, key in seen
            seen.add(key)


def _position(entry, next_id: int, k: int, where: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(ids, log-probs of the k best, label log-prob) of one prompt_logprobs element."""
    if not isinstance(entry, dict) or not entry:
        raise VllmImportError(f"{where}: expected an object of token id -> {{logprob, rank, decoded_token}}")
    try:
        pairs = [(int(t), float(v["logprob"])) for t, v in entry.items()]
        label = float(entry[str(next_id)]["logprob"])
    except KeyError:
        raise VllmImportError(f"{where}: the actual next token {next_id} is missing (vLLM always includes it; "
                              "was the file edited?)") from None
    except (TypeError, ValueError):
        raise VllmImportError(f"{where}: every entry needs an integer id key and a numeric logprob") from None
    pairs.sort(key=lambda p: (-p[1], p[0]))
    best = pairs[:k]
    return (np.array([p[0] for p in best], np.int64), np.array([p[1] for p in best], np.float64), label)


def _smallest_k(path: Path, tok) -> int:
    k = min((len(e) for _, _, lps, _ in _records(path, tok) for e in lps[1:] if isinstance(e, dict)), default=0)
    if k == 0:
        raise VllmImportError(f"{path}: no prompt_logprobs entries (run vLLM with prompt_logprobs=k)")
    return k


def import_vllm(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
                options: VllmImportOptions = VllmImportOptions()):
    """Write the cache ``out`` from the vLLM prompt-logprobs JSONL ``path``; returns its Manifest."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise VllmImportError(f"{path}: no such file (give the JSONL of vLLM prompt_logprobs)")
    tok = read_tokenizer(tokenizer_dir, VllmImportError)
    prepare_output(out, options.overwrite, VllmImportError)
    V = len(tok)
    k = options.k or _smallest_k(path, tok)
    layout = S.Layout(vocab_size=V)
    tok.save_pretrained(out / TOKENIZER_DIR)
    rows, n_rows, repeats, longest = [], 0, 0, 0
    with CacheWriter(out, layout) as writer:
        for where, ids, lps, repeat in _records(path, tok):
            if repeat:
                repeats += 1
                continue
            if lps[0] is not None or any(not 0 <= int(t) < V for t in ids):
                raise VllmImportError(f"{where}: prompt_logprobs[0] must be null and every prompt "
                                      f"token in [0, {V}) of the tokenizer {tokenizer_dir}")
            targets = [_position(lps[i], int(ids[i]), k, f"{where} prompt_logprobs[{i}]")
                       for i in range(1, len(ids))]
            for t_ids, _, _ in targets:
                if (t_ids < 0).any() or (t_ids >= V).any():
                    raise VllmImportError(f"{where}: a token id is outside the tokenizer's {V} ids "
                                          f"({tokenizer_dir}): wrong --tokenizer?")
            rows.append(ImportedRow(input_ids=ids, target_mask=np.arange(len(ids)) < len(ids) - 1,
                                    ids=[t[0] for t in targets], logprobs=[t[1] for t in targets],
                                    labels=[t[2] for t in targets]))
            n_rows, longest = n_rows + 1, max(longest, len(ids))
            if len(rows) == options.rows_per_batch:
                writer.write(imported_batch(rows, V))
                rows = []
        if rows:
            writer.write(imported_batch(rows, V))
        if n_rows == 0:
            raise VllmImportError(f"{path}: no records")
        return writer.finish(
            targets=TargetSpec(kind="topk", k=k, temperature=options.temperature),
            teacher=TeacherInfo(name_or_path=options.teacher, config_sha256="", dtype="unknown", output_size=V),
            tokenizer=TokenizerInfo(fingerprint=tokenizer_fingerprint(tok), vocab_size=V),
            data=DataInfo(sources=[str(path)], fingerprint=file_sha256(path), seq_len=longest, packing="document",
                          documents_read=n_rows + repeats, documents_used=n_rows),
            extra={"imported_from": "vllm prompt_logprobs", "entropy": ENTROPY_NOTE,
                   REPEATS_KEY: repeats})

