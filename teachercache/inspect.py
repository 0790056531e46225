"""`teachercache inspect`: what is in a cache, in numbers (the format-level half of the inspection tools).

Totals, bytes per token split by column, the target kind and its parameters, how many ids are stored per
position, the captured mass, and the fingerprints. Everything comes from the manifest and from the small
per-position columns; the big target streams are only read for the per-column byte split, which is
measured on a sample of record batches (each column re-compressed alone with the shard's zstd settings)
and scaled so that the columns add up to the real file sizes.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from . import schema as S
from .cache import Cache
from .shards import ZSTD_LEVEL


def inspect_cache(path: str | os.PathLike, sample_batches: int = 4) -> dict:
    """A JSON-ready summary of the cache at ``path`` (see the module docstring)."""
    cache = Cache.open(path, verify_checksums=False)
    m = cache.manifest
    sizes, captured = [], []
    for batch in cache.iter_batches(columns=[S.TARGET_SIZES, S.REST_MASS]):
        sizes.append(batch.target_sizes)
        captured.append(1.0 - batch.rest_mass)
    sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    captured = np.concatenate(captured) if captured else np.zeros(0, np.float32)
    tokens = max(m.totals.tokens, 1)
    column_bytes = column_bytes_estimate(cache, sample_batches)
    return {
        "path": str(path),
        "format": {"name": m.format, "version": m.format_version, "created": m.created},
        "teacher": dataclasses.asdict(m.teacher),
        "tokenizer": dataclasses.asdict(m.tokenizer),
        "targets": dataclasses.asdict(m.targets),
        "layout": m.layout.to_dict(),
        "data": dataclasses.asdict(m.data),
        "totals": dataclasses.asdict(m.totals),
        "shards": len(m.shards),
        "bytes_per_token": m.totals.bytes / tokens,
        "bytes_per_token_by_column": {name: b / tokens for name, b in column_bytes.items()},
        "ids_per_position": _stats(sizes),
        "captured_mass": _stats(captured),
    }


def _stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"count": 0}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    return {"count": int(len(values)), "mean": float(values.mean()), "min": float(q[0]), "p10": float(q[1]),
            "p50": float(q[2]), "p90": float(q[3]), "max": float(q[4])}


def column_bytes_estimate(cache: Cache, sample_batches: int = 4, zstd_level: int = ZSTD_LEVEL) -> dict[str, float]:
    """Estimated compressed bytes of each column over the whole cache (see the module docstring)."""
    options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=zstd_level))
    measured = dict.fromkeys(cache.layout.columns(), 0)
    for i in range(len(cache.shards)):
        with cache.open_shard(i) as reader:
            for b in range(min(sample_batches, reader.num_batches)):
                record = reader.read_record_batch(b)
                for name in measured:
                    measured[name] += _compressed_size(record.select([name]), options)
    total = sum(measured.values()) or 1
    return {name: cache.manifest.totals.bytes * size / total for name, size in measured.items()}


def _compressed_size(record: pa.RecordBatch, options: ipc.IpcWriteOptions) -> int:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, record.schema, options=options) as writer:
        writer.write_batch(record)
    return sink.getvalue().size


def format_report(report: dict) -> str:
    """The human-readable text of an inspect_cache() report."""
    t, tg = report["totals"], report["targets"]
    params = ", ".join(f"{k}={v}" for k, v in tg.items() if v is not None and k != "kind")
    lines = [
        f"cache        {report['path']}  (format {report['format']['name']} v{report['format']['version']}, "
        f"created {report['format']['created']})",
        f"teacher      {report['teacher']['name_or_path']}  dtype {report['teacher']['dtype']}  "
        f"config {report['teacher']['config_sha256'][:16]}",
        f"tokenizer    vocab {report['tokenizer']['vocab_size']}  fingerprint "
        f"{report['tokenizer']['fingerprint'][:16]}",
        f"targets      {tg['kind']}  ({params})",
        f"hidden       layers {report['layout']['hidden_layers'] or 'none'}",
        f"totals       {t['rows']:,} rows  {t['tokens']:,} tokens  {t['target_positions']:,} target positions  "
        f"{t['target_entries']:,} entries  {t['bytes']:,} bytes in {report['shards']} shards",
        f"bytes/token  {report['bytes_per_token']:.2f}",
    ]
    for name, value in sorted(report["bytes_per_token_by_column"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<16}{value:8.2f}")
    k, c = report["ids_per_position"], report["captured_mass"]
    if k["count"]:
        lines.append(f"ids/position mean {k['mean']:.1f}  min {k['min']:.0f}  p50 {k['p50']:.0f}  "
                     f"p90 {k['p90']:.0f}  max {k['max']:.0f}")
        lines.append(f"captured     mean {c['mean']:.4f}  p10 {c['p10']:.4f}  p50 {c['p50']:.4f}  "
                     f"min {c['min']:.4f}")
    return "\n".join(lines)
