"""`teachercache import-vllm`: a cache from vLLM's prompt log-probs, for teachers served by vLLM.

Input: JSON Lines, one record per prompt, with vLLM's own field names:

    {"prompt_token_ids": [t0, t1, ..., t_{T-1}],
     "prompt_logprobs": [null, {"<id>": {"logprob": float, "rank": int, "decoded_token": str}, ...}, ...]}

This is how vLLM returns them, serialised to JSON: ``RequestOutput.prompt_logprobs`` from
``LLM.generate(..., SamplingParams(prompt_logprobs=k))`` and the ``prompt_logprobs`` field of its
OpenAI-compatible completions response are a ``PromptLogprobs = list[Optional[dict[int, Logprob]]]``
whose ``Logprob`` has ``logprob``, ``rank`` (the id's rank in the vocabulary, >= 1) and
``decoded_token`` (vllm/logprobs.py, https://docs.vllm.ai/en/v0.10.2/api/vllm/logprobs.html); JSON makes
the int keys strings. Element 0 is null (the first token has no prediction); element i is the teacher's
distribution of token i given tokens < i, holding the k most likely ids and also the actual token
t_i (so k or k+1 entries), log-probs over the full vocabulary.

In the cache, element i becomes the target of position i-1 (the cache stores at position t the
prediction of token t+1): the k most likely ids (``k``: given, or the smallest entry count in the file),
the label log-prob from t_i's entry, rest mass 1 - sum(exp(stored log-probs)). vLLM gives no entropy;
the cache's entropy column holds an estimate, the entropy of the stored probabilities plus the rest mass
spread evenly over the V - k unstored ids (the largest entropy the tail can have), and the manifest's
``extra.entropy`` says so. One prompt is one row (packing ``document``); the last token has no target.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import schema as S
from .batch import RowBatch
from .cache import CacheWriter
from .errors import TeachercacheError
from .manifest import TOKENIZER_DIR, DataInfo, TargetSpec, TeacherInfo, TokenizerInfo, tokenizer_fingerprint

ENTROPY_NOTE = "estimated: stored probabilities plus the rest mass spread evenly over the unstored ids"


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


def _records(path: Path) -> Iterator[tuple[int, list[int], list]]:
    """(line number, prompt_token_ids, prompt_logprobs) of every non-empty line, checked for shape."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise VllmImportError(f"{where}: not valid JSON ({e})") from None
            ids, lps = rec.get("prompt_token_ids"), rec.get("prompt_logprobs") if isinstance(rec, dict) else None
            if not isinstance(ids, list) or not isinstance(lps, list):
                raise VllmImportError(f"{where}: fields prompt_token_ids and prompt_logprobs must both be lists "
                                      "(run vLLM with prompt_logprobs=k and keep prompt_token_ids)")
            if len(ids) != len(lps) or len(ids) < 2:
                raise VllmImportError(f"{where}: prompt_logprobs has {len(lps)} elements for {len(ids)} prompt "
                                      "tokens; vLLM gives one per token (the first null) and a row needs 2 tokens")
            yield line_no, ids, lps


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


def _batch(rows: list[tuple[list[int], list[np.ndarray], list[np.ndarray], list[float]]], V: int) -> RowBatch:
    lengths = [len(r[0]) for r in rows]
    ids = [x for r in rows for x in r[1]]
    lps = [x for r in rows for x in r[2]]
    sizes = [len(x) for x in ids]
    mask = np.concatenate([np.arange(n) < n - 1 for n in lengths])
    flat_lp = np.concatenate(lps) if lps else np.zeros(0)
    p = np.exp(flat_lp)
    pos = np.repeat(np.arange(len(sizes)), sizes)
    stored = np.bincount(pos, p, minlength=len(sizes))
    rest = np.clip(1.0 - stored, 0.0, 1.0)
    plogp = np.bincount(pos, np.where(p > 0, p * flat_lp, 0.0), minlength=len(sizes))
    tail = np.maximum(V - np.asarray(sizes), 1)
    entropy = -plogp - np.where(rest > 0, rest * np.log(np.maximum(rest, 1e-300) / tail), 0.0)
    return RowBatch(row_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    input_ids=np.concatenate([np.asarray(r[0], np.int32) for r in rows]), target_mask=mask,
                    target_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                    target_ids=np.concatenate(ids).astype(np.int32), target_logprobs=flat_lp.astype(np.float32),
                    label_logprob=np.asarray([x for r in rows for x in r[3]], np.float32),
                    rest_mass=rest.astype(np.float32), entropy=np.maximum(entropy, 0.0).astype(np.float32))


def _smallest_k(path: Path) -> int:
    k = min((len(e) for _, _, lps in _records(path) for e in lps[1:] if isinstance(e, dict)), default=0)
    if k == 0:
        raise VllmImportError(f"{path}: no prompt_logprobs entries (run vLLM with prompt_logprobs=k)")
    return k


def import_vllm(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
                options: VllmImportOptions = VllmImportOptions()):
    """Write the cache ``out`` from the vLLM prompt-logprobs JSONL ``path``; returns its Manifest."""
    from transformers import AutoTokenizer

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise VllmImportError(f"{path}: no such file (give the JSONL of vLLM prompt_logprobs)")
    if out.exists() and any(out.iterdir()):
        if not options.overwrite:
            raise VllmImportError(f"{out}: not empty; add --overwrite to replace it")
        import shutil
        shutil.rmtree(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    V = len(tok)
    k = options.k or _smallest_k(path)
    layout = S.Layout(vocab_size=V)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / TOKENIZER_DIR)
    rows, n_rows, longest = [], 0, 0
    with CacheWriter(out, layout) as writer:
        for line_no, ids, lps in _records(path):
            if lps[0] is not None or any(not 0 <= int(t) < V for t in ids):
                raise VllmImportError(f"{path}:{line_no}: prompt_logprobs[0] must be null and every prompt "
                                      f"token in [0, {V}) of the tokenizer {tokenizer_dir}")
            targets = [_position(lps[i], int(ids[i]), k, f"{path}:{line_no} prompt_logprobs[{i}]")
                       for i in range(1, len(ids))]
            for t_ids, _, _ in targets:
                if (t_ids < 0).any() or (t_ids >= V).any():
                    raise VllmImportError(f"{path}:{line_no}: a token id is outside the tokenizer's {V} ids "
                                          f"({tokenizer_dir}): wrong --tokenizer?")
            rows.append((ids, [t[0] for t in targets], [t[1] for t in targets], [t[2] for t in targets]))
            n_rows, longest = n_rows + 1, max(longest, len(ids))
            if len(rows) == options.rows_per_batch:
                writer.write(_batch(rows, V))
                rows = []
        if rows:
            writer.write(_batch(rows, V))
        if n_rows == 0:
            raise VllmImportError(f"{path}: no records")
        return writer.finish(
            targets=TargetSpec(kind="topk", k=k, temperature=options.temperature),
            teacher=TeacherInfo(name_or_path=options.teacher, config_sha256="", dtype="unknown", output_size=V),
            tokenizer=TokenizerInfo(fingerprint=tokenizer_fingerprint(tok), vocab_size=V),
            data=DataInfo(sources=[str(path)], fingerprint=_file_sha256(path), seq_len=longest, packing="document",
                          documents_read=n_rows, documents_used=n_rows),
            extra={"imported_from": "vllm prompt_logprobs", "entropy": ENTROPY_NOTE})


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
