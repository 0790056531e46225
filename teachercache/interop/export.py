"""`teachercache export`: a cache as a dataset other trainers read.

``axolotl``: one parquet file with the columns Axolotl's KD plugin collates (input_ids, labels,
target_token_ids, target_logprobs, target_mask; T × K per row, padded as its collator pads), log-probs
renormalised over the stored ids by default, as its loss expects. ``hf``: a ``datasets`` save_to_disk
directory holding the cache itself, decoded. Both stream one record batch at a time. docs/interop.md has
every column and the alignment of positions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from teachercache.errors import TeachercacheError
from teachercache.format.cache import Cache
from teachercache.format.manifest import MANIFEST_NAME
from teachercache.format.outputs import describe, identify, marker_json, options_record, write_marker
from teachercache.format.shards import file_sha256
from teachercache.inspect.rows import CacheRow, iter_cache_rows

FORMATS = ("axolotl", "hf")
EXPORT_KEY = b"teachercache"
"""Parquet metadata key of an exported file: the export's marker (kind, options, fingerprint)."""
PAD_LOGPROB = -1e9
IGNORE_INDEX = -100


class ExportError(TeachercacheError):
    """An export that cannot be written as asked."""


@dataclass(frozen=True)
class ExportOptions:
    format: str = "axolotl"
    """axolotl (one parquet file) or hf (a datasets save_to_disk directory)."""
    renormalize: bool = True
    """axolotl: renormalise each position's stored log-probs to sum to 1 over the stored ids."""
    overwrite: bool = False
    """Replace an existing output."""
    rows_per_group: int = 256
    """axolotl: rows per parquet row group."""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ExportError(f"--format {self.format!r}: choose one of {FORMATS}")


AXOLOTL_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int64())),
    ("target_token_ids", pa.list_(pa.list_(pa.int64()))),
    ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("target_mask", pa.list_(pa.list_(pa.int32()))),
])


def labels_of(row: CacheRow) -> np.ndarray:
    """(T,) int64: input_ids[t] where position t-1 carries a target, else -100."""
    labels = np.full(len(row.input_ids), IGNORE_INDEX, np.int64)
    labels[row.positions + 1] = row.input_ids[row.positions + 1]
    return labels


def axolotl_row(row: CacheRow, renormalize: bool = True, samples: int | None = None) -> dict:
    """One cache row in Axolotl's KD columns (see the module docstring)."""
    T = len(row.input_ids)
    sizes = np.diff(row.offsets)
    K = max(int(sizes.max(initial=0)), 1)
    ids = np.zeros((T, K), np.int64)
    lps = np.full((T, K), PAD_LOGPROB, np.float32)
    mask = np.zeros((T, K), np.int32)
    for j, t in enumerate(row.positions.tolist()):
        e = row.entries(j)
        n = e.stop - e.start
        lp = np.asarray(row.logprobs[e], np.float64)
        if row.counts is not None:
            lp = np.log(row.counts[e] / (samples or row.counts[e].sum()))
        elif renormalize:
            lp = lp - np.logaddexp.reduce(lp)
        ids[t, :n], lps[t, :n], mask[t, :n] = row.ids[e], lp, 1
    return {"input_ids": row.input_ids.astype(np.int32).tolist(), "labels": labels_of(row).tolist(),
            "target_token_ids": ids.tolist(), "target_logprobs": lps.tolist(), "target_mask": mask.tolist()}


def hf_row(row: CacheRow) -> dict:
    """One cache row, decoded, in the hf export's columns."""
    pos = row.positions
    out = {"input_ids": row.input_ids.astype(np.int32).tolist(), "target_mask": row.target_mask.tolist(),
           "labels": labels_of(row).tolist(), "positions": pos.tolist(),
           "target_token_ids": [row.ids[row.entries(j)].tolist() for j in range(len(pos))],
           "target_logprobs": [row.logprobs[row.entries(j)].tolist() for j in range(len(pos))],
           "label_logprob": row.label_logprob.tolist(), "rest_mass": row.rest_mass.tolist(),
           "entropy": row.entropy.tolist()}
    if row.counts is not None:
        out["target_counts"] = [row.counts[row.entries(j)].tolist() for j in range(len(pos))]
    return out


def _hf_features(sampled: bool):
    from datasets import Features, List, Value

    def nested(value):
        return List(List(Value(value)))

    features = {"input_ids": List(Value("int32")), "target_mask": List(Value("bool")),
                "labels": List(Value("int64")), "positions": List(Value("int64")),
                "target_token_ids": nested("int32"), "target_logprobs": nested("float32"),
                "label_logprob": List(Value("float32")), "rest_mass": List(Value("float32")),
                "entropy": List(Value("float32"))}
    if sampled:
        features["target_counts"] = nested("int32")
    return Features(features)


def export_cache(path: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions()) -> int:
    """Write the cache at ``path`` to ``out`` in ``options.format``; returns the number of rows written.

    ``out`` may not lie inside the cache, nor the cache inside ``out``; an existing ``out`` is replaced only
    with ``options.overwrite`` and only when it is an earlier export of this kind (a parquet file carrying
    the ``teachercache`` metadata key, or a directory with the export marker): nothing else is deleted.
    The file is written beside ``out`` under a temporary name and renamed into place at the end."""
    cache = Cache.open(path)
    out = Path(out)
    source, target = cache.path.resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ExportError(f"{out}: the export would be written into (or over) its own source cache {cache.path}; "
                          "choose an --out outside it")
    if out.exists() or out.is_symlink():
        _check_replaceable(out, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = options_record(options, frozenset({"overwrite"})) | {
        "cache": str(source), "manifest_sha256": file_sha256(cache.path / MANIFEST_NAME)}
    if options.format == "axolotl":
        return _write_axolotl(cache, out, options, record)
    return _write_hf(cache, out, record)


def _check_replaceable(out: Path, options: ExportOptions) -> None:
    """Refuse to replace ``out`` unless asked to and it is an export of the same format."""
    if not options.overwrite:
        raise ExportError(f"{out} already exists; add --overwrite to replace it (an earlier export only)")
    if out.is_symlink():
        raise ExportError(f"{out}: a symbolic link; export will not replace it: choose another --out")
    if options.format == "axolotl":
        if out.is_dir():
            raise ExportError(f"{out}: a directory, not an exported parquet file; --overwrite replaces only an "
                              "earlier export: choose another --out")
        try:
            metadata = pq.read_schema(out).metadata or {}
        except (OSError, pa.ArrowInvalid):
            metadata = {}
        if EXPORT_KEY not in metadata:
            raise ExportError(f"{out}: not a teachercache export (no '{EXPORT_KEY.decode()}' metadata); --overwrite "
                              "replaces only an earlier export: choose another --out")
        return
    if not out.is_dir():
        raise ExportError(f"{out}: a file, not an exported dataset directory; choose another --out")
    found, _ = identify(out)
    if found != "export":
        raise ExportError(f"{out}: not a teachercache export directory ({describe(out)}); --overwrite replaces "
                          "only an earlier export: choose another --out")


def _write_axolotl(cache: Cache, out: Path, options: ExportOptions, record: dict) -> int:
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    n, group = 0, []
    samples = cache.manifest.targets.samples
    schema = AXOLOTL_SCHEMA.with_metadata({EXPORT_KEY: json.dumps(marker_json("export", record), default=str)})
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for row in iter_cache_rows(cache):
                group.append(axolotl_row(row, options.renormalize, samples))
                if len(group) == options.rows_per_group:
                    writer.write_table(pa.Table.from_pylist(group, schema=schema))
                    n, group = n + len(group), []
            if group:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                n += len(group)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _write_hf(cache: Cache, out: Path, record: dict) -> int:
    """A datasets save_to_disk directory, built beside ``out`` and swapped in when complete."""
    try:
        from datasets import Dataset
    except ImportError:
        raise ExportError("--format hf needs the `datasets` package: pip install 'teachercache[hf]'") from None

    def rows():
        for row in iter_cache_rows(cache):
            yield hf_row(row)

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build-") as work:
        dataset = Dataset.from_generator(rows, features=_hf_features(cache.layout.sampled), cache_dir=work)
        staged = Path(work) / "export"
        dataset.save_to_disk(str(staged))
        write_marker(staged, "export", record)
        if out.exists():
            shutil.rmtree(out)          # an earlier export of this kind (checked above)
        os.replace(staged, out)
        return len(dataset)
