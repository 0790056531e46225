"""`teachercache import-vllm`: a cache from vLLM's prompt log-probs, for teachers served by vLLM.

Input: JSON Lines with vLLM's ``prompt_token_ids`` and ``prompt_logprobs`` (element 0 null; element i the
k most likely ids of token i, and token i itself, as {id: {logprob, rank, decoded_token}}). Element i
becomes the target of position i-1: the k best ids, the label log-prob, rest mass and entropy estimated
(teachercache.interop.logprobs). One prompt is one row. docs/interop.md has the exact shapes and sources.
"""

from __future__ import annotations

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
from teachercache.interop.logprobs import (ENTROPY_NOTE, ImportedRow, imported_batch, jsonl_records, prepare_output,
                                           read_tokenizer)


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


def _records(path: Path) -> Iterator[tuple[str, list[int], list]]:
    """("file:line", prompt_token_ids, prompt_logprobs) of every non-empty line, checked for shape."""
    for where, rec in jsonl_records(path, VllmImportError):
        ids, lps = rec.get("prompt_token_ids"), rec.get("prompt_logprobs") if isinstance(rec, dict) else None
        if not isinstance(ids, list) or not isinstance(lps, list):
            raise VllmImportError(f"{where}: fields prompt_token_ids and prompt_logprobs must both be lists "
                                  "(run vLLM with prompt_logprobs=k and keep prompt_token_ids)")
        if len(ids) != len(lps) or len(ids) < 2:
            raise VllmImportError(f"{where}: prompt_logprobs has {len(lps)} elements for {len(ids)} prompt "
                                  "tokens; vLLM gives one per token (the first null) and a row needs 2 tokens")
        yield where, ids, lps


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


def _smallest_k(path: Path) -> int:
    k = min((len(e) for _, _, lps in _records(path) for e in lps[1:] if isinstance(e, dict)), default=0)
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
    k = options.k or _smallest_k(path)
    layout = S.Layout(vocab_size=V)
    tok.save_pretrained(out / TOKENIZER_DIR)
    rows, n_rows, longest = [], 0, 0
    with CacheWriter(out, layout) as writer:
        for where, ids, lps in _records(path):
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
                          documents_read=n_rows, documents_used=n_rows),
            extra={"imported_from": "vllm prompt_logprobs", "entropy": ENTROPY_NOTE})

