"""What the log-prob importers share: reading JSON Lines, and turning imported top-k lists into row batches.

An importer (``vllm``, ``openai_chat``) loads its ``--tokenizer`` with ``read_tokenizer`` (never running
code the tokenizer files name), reads one record per line with ``jsonl_records`` (or, with ``json_records``,
also a file that is one JSON array of records or one multi-line JSON object), maps each record
to an ``ImportedRow`` (its tokens, which positions carry a target, and per target position the stored ids,
their log-probs and the actual next token's log-prob), and writes them with ``imported_batch``. Sources
give no entropy and no rest mass, so both are estimated here from the stored list alone: rest = 1 - sum
of the stored probabilities; entropy = that of the stored probabilities plus the rest spread evenly over
the V - k unstored ids (the largest entropy the tail can have), as ``ENTROPY_NOTE`` records in a manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from teachercache.errors import TokenizerLoadError
from teachercache.format.batch import RowBatch
from teachercache.format.cache import load_tokenizer_without_code

ENTROPY_NOTE = "estimated: stored probabilities plus the rest mass spread evenly over the unstored ids"


@dataclass
class ImportedRow:
    """One imported record as a row: T tokens, P target positions."""

    input_ids: list[int]
    """(T,) the row's token ids."""
    target_mask: np.ndarray
    """(T,) bool: True at t when the distribution of token t+1 is stored."""
    ids: list[np.ndarray]
    """P arrays of stored ids, most likely first."""
    logprobs: list[np.ndarray]
    """P arrays of their log-probs over the teacher's full vocabulary."""
    labels: list[float]
    """(P,) log-prob of the actual next token."""


def jsonl_records(path: Path, error: type[Exception]) -> Iterator[tuple[str, object]]:
    """("file:line", parsed JSON) of every non-blank line; ``error`` names the line that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e})") from None


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def json_records(path: Path, error: type[Exception]) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) of every record of ``path``, which is one of:

    - JSON Lines, one value a line (read line by line; ``where`` is "file:line");
    - one JSON array whose elements are the records (read whole; ``where`` is "file:line [i]", the line
      element i starts on and its index: ``json.dump`` writes a whole array on one line);
    - one JSON value over several lines, e.g. a pretty-printed response (one record; ``where`` is "file:1").

    A file whose first line is not JSON on its own is read as one value; ``error`` names what is not JSON."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        first_line = (head + f.readline()).split("\n", 1)[0] if head else ""
    if head.startswith("["):
        yield from _array_records(path, error)
        return
    try:
        json.loads(first_line) if first_line else None
    except json.JSONDecodeError:
        if head.startswith("{"):
            try:
                yield f"{path}:1", json.loads(Path(path).read_text(encoding="utf-8"))
                return
            except json.JSONDecodeError as e:
                raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); give JSON Lines, "
                            "one JSON array of records or one JSON object") from None
    yield from jsonl_records(path, error)


def _array_records(path: Path, error: type[Exception]) -> Iterator[tuple[str, object]]:
    """The elements of a file holding one JSON array, each with "file:line [i]"."""
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    index, line, counted_to = 0, 1, 0
    while not (index == 0 and text.startswith("]", pos)):
        line, counted_to = line + text.count("\n", counted_to, pos), pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{e.lineno}: element [{index}] is not valid JSON ({e.msg}, "
                        f"column {e.colno})") from None
        yield f"{path}:{line} [{index}]", value
        pos = _JSON_SPACE.match(text, end).end()
        if not text.startswith(",", pos):
            break
        pos, index = _JSON_SPACE.match(text, pos + 1).end(), index + 1
    if not text.startswith("]", pos) or text[pos + 1:].strip():
        line = text.count("\n", 0, pos) + 1
        raise error(f"{path}:{line}: the JSON array is not closed after element [{index}] (expected , or ] "
                    "and nothing after it)")


def read_tokenizer(tokenizer_dir: str | os.PathLike, error: type[Exception]):
    """The tokenizer of ``--tokenizer``, loaded without running code (``load_tokenizer_without_code``): files
    that name custom code (an ``auto_map`` beside a .py file) are refused with ``error``, never imported and
    never asked about on stdin."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise error(f"--tokenizer {tokenizer_dir}: no such directory (give the directory of the teacher's tokenizer)")
    try:
        return load_tokenizer_without_code(path)
    except TokenizerLoadError as e:
        fix = ("give a directory with a standard tokenizer, tokenizer.json and a tokenizer_config.json without "
               "auto_map, as save_pretrained of a built-in tokenizer class writes them" if e.custom_code else
               "give the directory the teacher's tokenizer was saved to (save_pretrained)")
        raise error(f"--tokenizer {tokenizer_dir}: {e.problem}; {fix}") from None


def check_output(out: Path, overwrite: bool, error: type[Exception]) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise error(f"{out}: not empty; add --overwrite to replace it")


def prepare_output(out: Path, overwrite: bool, error: type[Exception]) -> None:
    """``check_output``, then empty ``out`` (create it when missing)."""
    check_output(out, overwrite, error)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def rest_and_entropy(logprobs: np.ndarray, sizes: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest mass (P,), entropy estimate (P,)) of P positions whose stored log-probs are ``logprobs`` (E,),
    ``sizes`` (P,) per position (see the module docstring)."""
    p = np.exp(logprobs)
    pos = np.repeat(np.arange(len(sizes)), sizes)
    rest = np.clip(1.0 - np.bincount(pos, p, minlength=len(sizes)), 0.0, 1.0)
    plogp = np.bincount(pos, np.where(p > 0, p * logprobs, 0.0), minlength=len(sizes))
    tail = np.maximum(vocab_size - np.asarray(sizes), 1)
    entropy = -plogp - np.where(rest > 0, rest * np.log(np.maximum(rest, 1e-300) / tail), 0.0)
    return rest, np.maximum(entropy, 0.0)


def imported_batch(rows: list[ImportedRow], vocab_size: int) -> RowBatch:
    """The RowBatch of imported rows, with rest mass and entropy estimated."""
    ids = [x for r in rows for x in r.ids]
    sizes = np.array([len(x) for x in ids], np.int64)
    flat = np.concatenate([x for r in rows for x in r.logprobs]) if ids else np.zeros(0)
    rest, entropy = rest_and_entropy(flat, sizes, vocab_size)
    return RowBatch(row_offsets=np.concatenate([[0], np.cumsum([len(r.input_ids) for r in rows])]).astype(np.int64),
                    input_ids=np.concatenate([np.asarray(r.input_ids, np.int32) for r in rows]),
                    target_mask=np.concatenate([r.target_mask for r in rows]),
                    target_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                    target_ids=(np.concatenate(ids) if ids else np.zeros(0)).astype(np.int32),
                    target_logprobs=flat.astype(np.float32),
                    label_logprob=np.asarray([x for r in rows for x in r.labels], np.float32),
                    rest_mass=rest.astype(np.float32), entropy=entropy.astype(np.float32))
