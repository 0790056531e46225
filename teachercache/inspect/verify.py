"""`teachercache verify`: is a cache sound?

Format-level checks (manifest, format version (3, or 2 for caches written before it; each shard's must be
its manifest's), paths, declared sizes, every shard's size, SHA-256, schema and counts; the tokenizer/
files, loaded and compared with the manifest's fingerprint; no symbolic link on the way to any file read), each a Fault naming the file; ``deep=True`` also decodes every row and checks its
values (ids in range and distinct, log-probs, stored + rest mass = 1 within the quantiser's tolerance,
labels, draw counts, hidden states), each fault named by shard, row and position. docs/inspect.md lists
every check and its tolerance.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from teachercache.errors import CacheCorruptError, CacheError
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.cache import Cache, refuse_links
from teachercache.format.manifest import MANIFEST_NAME, SHARDS_DIR, TOKENIZER_DIR
from teachercache.format.records import decode_batch
from teachercache.inspect.rows import next_tokens, target_tokens


@dataclass(frozen=True)
class Fault:
    file: str
    problem: str
    row: int | None = None
    """Row within the shard (counted over its record batches), for faults found by the deep checks."""
    position: int | None = None
    """Token index within the row."""

    def __str__(self) -> str:
        where = "".join(f" {name} {v}" for name, v in (("row", self.row), ("position", self.position))
                        if v is not None)
        return f"{self.file}{where}: {self.problem}"


def verify_cache(path: str | os.PathLike, deep: bool = False) -> list[Fault]:
    """Every fault found in the cache at ``path``; an empty list means it is sound. ``deep`` adds the
    row-by-row checks (see the module docstring). A file reached through a symbolic link is a fault, and is
    not read."""
    try:
        refuse_links(path, MANIFEST_NAME)
        cache = Cache.open(path)
    except CacheError as e:
        return [Fault(e.path, e.problem)]
    faults: list[Fault] = []
    for i, info in enumerate(cache.shards):
        try:
            refuse_links(cache.path, info.file)
            cache.check_shard(i)
            faults += _check_counts(cache, i)
            if deep:
                faults += check_rows(cache, i)
        except CacheError as e:
            faults.append(Fault(e.path, e.problem))
    faults += _check_tokenizer(cache)
    if cache.mirror is not None:  # a cache at a URL: its shards/ prefix, listed
        listed = {PurePosixPath(info.file).name for info in cache.shards if info.file.startswith(f"{SHARDS_DIR}/")}
        for extra in sorted(n for n in cache.mirror.storage.list(SHARDS_DIR) if n.endswith(".arrow")):
            if extra not in listed:
                faults.append(Fault(cache.mirror.storage.location(f"{SHARDS_DIR}/{extra}"),
                                    "shard file is not listed in the manifest"))
        return list(dict.fromkeys(faults))
    listed = {os.path.normpath(cache.path / info.file) for info in cache.shards}  # as named, links not followed
    shard_dir = Path(path) / SHARDS_DIR
    if shard_dir.is_dir() and not shard_dir.is_symlink():
        for extra in sorted(p.name for p in shard_dir.iterdir() if p.name.endswith(".arrow")):
            if os.path.normpath(shard_dir / extra) not in listed:
                faults.append(Fault(str(shard_dir / extra), "shard file is not listed in the manifest"))
    return list(dict.fromkeys(faults))  # a linked directory is one fault, not one per shard under it


def _check_tokenizer(cache: Cache) -> list[Fault]:
    """The tokenizer/ directory: its files (no links, bounded sizes and JSON), then the tokenizer they load,
    compared with the manifest's tokenizer.vocab_size and fingerprint (``Cache.tokenizer``). A cache without
    the directory has nothing to check: the commands that need its tokenizer say so."""
    if not os.path.lexists(cache.path / TOKENIZER_DIR):
        return []
    try:
        cache.tokenizer()
    except CacheError as e:
        return [Fault(e.path, e.problem)]
    return []


def _check_counts(cache: Cache, i: int) -> list[Fault]:
    info = cache.shards[i]
    rows = tokens = positions = entries = 0
    with cache.open_shard(i, columns=[S.INPUT_IDS, S.TARGET_SIZES]) as reader:
        for b in range(reader.num_batches):
            record = reader.read_record_batch(b)
            sizes = record.column(S.TARGET_SIZES).values.to_numpy()
            rows += record.num_rows
            tokens += len(record.column(S.INPUT_IDS).values)
            positions += len(sizes)
            entries += int(sizes.sum(dtype=np.int64))
    found = dict(rows=rows, tokens=tokens, target_positions=positions, target_entries=entries)
    return [Fault(str(reader.path), f"holds {value} {name}, the manifest says {getattr(info, name)}")
            for name, value in found.items() if value != getattr(info, name)]


# ---------------------------------------------------------------------------------------------------
# Deep checks: every row decoded.

_SUM_SLACK = 2 / S.REST_SCALE + 1e-5
"""Allowed |stored mass + rest - 1| beyond the entries' own quantisation: the rest mass's rounding."""


def check_rows(cache: Cache, i: int) -> list[Fault]:
    """The deep checks of shard ``i`` (see the module docstring)."""
    faults: list[Fault] = []
    with cache.open_shard(i) as reader:
        first_row = 0
        for b in range(reader.num_batches):
            record = reader.read_record_batch(b)
            found = _check_record(record, cache, str(reader.path), first_row)
            faults += found
            first_row += record.num_rows
    return faults


def _check_record(record: pa.RecordBatch, cache: Cache, file: str, first_row: int) -> list[Fault]:
    layout = cache.layout
    try:
        batch = decode_batch(record, layout, where=file)
    except CacheCorruptError as refused:
        relaxed = dataclasses.replace(layout, vocab_size=min(1 << (8 * layout.id_bytes), 1 << 24))  # same version
        try:  # decode again without the vocabulary bound, to name the positions at fault
            batch = decode_batch(record, relaxed, where=file)
        except CacheCorruptError:
            return [Fault(file, f"record batch of rows {first_row} to {first_row + record.num_rows - 1} does "
                                f"not decode: {refused.problem}")]
    return _check_batch(batch, cache, file, first_row)


def _check_batch(batch: RowBatch, cache: Cache, file: str, first_row: int) -> list[Fault]:
    """Faults of a decoded RowBatch, one per (position, kind of fault)."""
    V, layout = cache.layout.vocab_size, cache.layout
    tok = target_tokens(batch)
    row_of_token = np.repeat(np.arange(batch.num_rows), np.diff(batch.row_offsets))
    faults: list[Fault] = []

    def report(positions: np.ndarray, problem, values=None) -> None:
        """``positions``: indices of target positions at fault; ``problem(value)`` says what is wrong."""
        for n, p in enumerate(np.asarray(positions, np.int64).tolist()):
            t = int(tok[p])
            r = int(row_of_token[t])
            faults.append(Fault(file, problem(None if values is None else values[n]), first_row + r,
                                t - int(batch.row_offsets[r])))

    bad_tokens = np.flatnonzero((batch.input_ids < 0) | (batch.input_ids >= V))
    for t in bad_tokens.tolist():
        r = int(row_of_token[t])
        faults.append(Fault(file, f"input token {int(batch.input_ids[t])} is outside [0, {V})",
                            first_row + r, t - int(batch.row_offsets[r])))
    nxt = next_tokens(batch)
    report(np.flatnonzero(nxt < 0), lambda _: "a target on the row's last token (there is no next token)")
    pos = np.repeat(np.arange(batch.num_positions), batch.target_sizes)
    ids = np.asarray(batch.target_ids, np.int64)
    out = np.flatnonzero((ids < 0) | (ids >= V))
    report(pos[out], lambda v: f"stored id {v} is outside the vocabulary [0, {V})", ids[out])
    order = np.lexsort((ids, pos))
    same = np.flatnonzero((np.diff(pos[order]) == 0) & (np.diff(ids[order]) == 0))
    dup_pos, first = np.unique(pos[order][same], return_index=True)
    report(dup_pos, lambda v: f"stored id {v} appears more than once", ids[order][same][first])
    lp = np.asarray(batch.target_logprobs, np.float64)
    bad_lp = np.flatnonzero(~np.isfinite(lp) | (lp > 0))
    report(pos[bad_lp], lambda v: f"stored log-prob {v:.4g} is not a finite value <= 0", lp[bad_lp])
    _check_values(batch, report)
    _check_mass(batch, pos, lp, layout.quantizer, report)
    _check_label(batch, pos, ids, lp, nxt, layout.quantizer, report)
    if layout.sampled:
        n = cache.manifest.targets.samples
        sums = np.bincount(pos, batch.target_counts, minlength=batch.num_positions).astype(np.int64)
        wrong = np.flatnonzero(sums != n)
        report(wrong, lambda v: f"draw counts sum to {v}, targets.samples is {n}", sums[wrong])
    for layer in layout.hidden_layers:
        h = batch.hidden.get(layer)
        if h is None or h.shape != (batch.num_positions, layout.hidden_width):
            faults.append(Fault(file, f"{S.hidden_column(layer)}: shape {None if h is None else h.shape}, "
                                      f"expected ({batch.num_positions}, {layout.hidden_width})", first_row))
            continue
        report(np.flatnonzero(~np.isfinite(h).all(axis=1)), lambda _: f"{S.hidden_column(layer)}: non-finite values")
    return faults


def _check_values(batch: RowBatch, report) -> None:
    label, rest, ent = (np.asarray(a, np.float64) for a in (batch.label_logprob, batch.rest_mass, batch.entropy))
    for name, values, bad in ((S.LABEL_LOGPROB, label, ~np.isfinite(label) | (label > 0)),
                              (S.REST_MASS, rest, ~np.isfinite(rest) | (rest < 0) | (rest > 1)),
                              (S.ENTROPY, ent, ~np.isfinite(ent) | (ent < 0))):
        where = np.flatnonzero(bad)
        report(where, lambda v, name=name: f"{name} {v:.4g} is out of range", values[where])


def _entry_slack(lp: np.ndarray, q: S.Quantizer) -> np.ndarray:
    """(E,) the largest decoding error (nats) of each entry, from the quantiser's piece it falls in."""
    starts = np.asarray(q.starts)
    steps = np.asarray(q.steps)
    piece = np.clip(np.searchsorted(starts, -lp, "right") - 1, 0, len(starts) - 1)
    return steps[piece] / 2


def _check_mass(batch: RowBatch, pos: np.ndarray, lp: np.ndarray, q: S.Quantizer, report) -> None:
    p = np.exp(np.minimum(lp, 0.0))
    mass = np.bincount(pos, p, minlength=batch.num_positions)
    tol = np.bincount(pos, p * np.expm1(_entry_slack(lp, q)), minlength=batch.num_positions) + _SUM_SLACK
    total = mass + np.asarray(batch.rest_mass, np.float64)
    wrong = np.flatnonzero(np.abs(total - 1.0) > tol)
    report(wrong, lambda v: f"stored mass + rest mass = {v[0]:.6f}, not 1 (tolerance {v[1]:.2g})",
           np.stack([total[wrong], tol[wrong]], axis=1))


def _check_label(batch: RowBatch, pos, ids, lp, nxt, q: S.Quantizer, report) -> None:
    hit = np.flatnonzero(ids == nxt[pos])
    label = np.asarray(batch.label_logprob, np.float64)[pos[hit]]
    slack = _entry_slack(lp[hit], q) + 0.5 / S.NATS16_SCALE + 1e-4
    clipped = label <= -S.NATS16_MAX + 0.01  # the label code saturates there
    wrong = np.flatnonzero((np.abs(label - lp[hit]) > slack) & ~clipped)
    report(pos[hit][wrong], lambda v: f"label log-prob {v[0]:.4f} differs from the stored log-prob "
                                      f"{v[1]:.4f} of the same (next) token",
           np.stack([label[wrong], lp[hit][wrong]], axis=1))
