"""`teachercache inspect`: what is in a cache, in numbers.

Totals, bytes per token by column, target kind and fingerprints; and the distributions that decide what
a student can learn: captured mass, teacher entropy, stored ids per position, and the rank of the actual
next token in the stored set, per shard too. Streaming over record batches (fixed-bin histograms, exact
integer counts), so memory stays flat. docs/inspect.md defines every figure.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.shards import ZSTD_LEVEL
from teachercache.inspect.rows import label_ranks

QUANTILES = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)
CAPTURED_EDGES = np.linspace(0.0, 1.0, 201)
"""Bins of the captured-mass histogram (fraction of probability)."""
ENTROPY_EDGES = np.linspace(0.0, 20.0, 401)
"""Bins of the entropy histogram (nats); larger values go to the last bin's overflow."""
_COLUMNS = [S.TARGET_SIZES, S.REST_MASS, S.ENTROPY, S.LABEL_LOGPROB, S.TARGET_IDS]


class Histogram:
    """Counts of values in fixed bins ``edges`` (plus an underflow and an overflow bin), with the exact
    count, sum, min and max; quantiles are interpolated within a bin."""

    def __init__(self, edges: np.ndarray):
        self.edges = np.asarray(edges, np.float64)
        self.counts = np.zeros(len(self.edges) + 1, np.int64)
        self.n, self.total, self.lo, self.hi = 0, 0.0, np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        if len(values) == 0:
            return
        self.counts += np.bincount(np.searchsorted(self.edges, values, "right"), minlength=len(self.counts))
        self.n += len(values)
        self.total += float(values.sum())
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))

    def quantile(self, q: float) -> float:
        cum = np.cumsum(self.counts)
        target = q * self.n
        b = int(np.searchsorted(cum, max(target, 1e-12)))
        left = self.edges[b - 1] if b >= 1 else self.lo
        right = self.edges[b] if b < len(self.edges) else self.hi
        before = cum[b - 1] if b >= 1 else 0
        inside = (target - before) / max(self.counts[b], 1)
        return float(np.clip(left + inside * (right - left), self.lo, self.hi))

    def summary(self) -> dict:
        if self.n == 0:
            return {"count": 0}
        out = {"count": self.n, "mean": self.total / self.n, "min": self.lo, "max": self.hi}
        out.update({_qname(q): self.quantile(q) for q in QUANTILES[1:-1]})
        out["histogram"] = {"edges": self.edges.tolist(), "counts": self.counts[1:-1].tolist(),
                            "below": int(self.counts[0]), "above": int(self.counts[-1])}
        return out


class IntCounts:
    """Exact counts of non-negative integers (ids per position, ranks); exact quantiles."""

    def __init__(self):
        self.counts = np.zeros(1, np.int64)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.int64)
        if len(values) == 0:
            return
        add = np.bincount(values)
        if len(add) > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(len(add) - len(self.counts), np.int64)])
        self.counts[:len(add)] += add

    def summary(self) -> dict:
        n = int(self.counts.sum())
        if n == 0:
            return {"count": 0}
        values = np.arange(len(self.counts))
        cum = np.cumsum(self.counts)
        nonzero = np.flatnonzero(self.counts)
        out = {"count": n, "mean": float((values * self.counts).sum() / n), "min": int(nonzero[0]),
               "max": int(nonzero[-1])}
        out.update({_qname(q): int(np.searchsorted(cum, q * n)) for q in QUANTILES[1:-1]})
        out["counts"] = {int(v): int(self.counts[v]) for v in nonzero}
        return out


def _qname(q: float) -> str:
    return f"p{q * 100:g}"


@dataclass
class _Tally:
    """The streaming accumulators of one shard or of the whole cache."""

    captured: Histogram = field(default_factory=lambda: Histogram(CAPTURED_EDGES))
    entropy: Histogram = field(default_factory=lambda: Histogram(ENTROPY_EDGES))
    sizes: IntCounts = field(default_factory=IntCounts)
    ranks: IntCounts = field(default_factory=IntCounts)
    positions: int = 0
    label_in_set: int = 0

    def add(self, batch) -> None:
        ranks = label_ranks(batch)
        self.captured.add(1.0 - batch.rest_mass)
        self.entropy.add(batch.entropy)
        self.sizes.add(batch.target_sizes)
        self.ranks.add(ranks[ranks > 0])
        self.positions += batch.num_positions
        self.label_in_set += int((ranks > 0).sum())

    def label_report(self) -> dict:
        share = self.label_in_set / self.positions if self.positions else 0.0
        return {"in_set_share": share, "out_of_set_share": 1.0 - share if self.positions else 0.0,
                "rank_in_set": self.ranks.summary()}


def inspect_cache(path: str | os.PathLike, sample_batches: int = 4) -> dict:
    """A JSON-ready summary of the cache at ``path`` (see the module docstring)."""
    cache = Cache.open(path)  # checksums first: a damaged shard is an error, not a summary of garbage
    m = cache.manifest
    whole, per_shard = _Tally(), []
    cache.prefetch(range(len(cache.shards)))  # a cache at a URL: downloads start ahead of the reader
    for i, info in enumerate(cache.shards):
        shard = _Tally()
        with cache.open_shard(i, columns=_COLUMNS) as reader:
            for batch in reader:
                shard.add(batch)
                whole.add(batch)
        per_shard.append(_shard_line(info, shard))
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
        "ids_per_position": whole.sizes.summary(),
        "captured_mass": whole.captured.summary(),
        "entropy": whole.entropy.summary(),
        "label": whole.label_report(),
        "per_shard": per_shard,
    }


def _shard_line(info, tally: _Tally) -> dict:
    def mean(summary):
        return summary.get("mean", float("nan"))

    return {"file": info.file, "rows": info.rows, "tokens": info.tokens,
            "target_positions": info.target_positions, "bytes": info.bytes,
            "bytes_per_token": info.bytes / max(info.tokens, 1),
            "ids_per_position": mean(tally.sizes.summary()), "captured_mass": mean(tally.captured.summary()),
            "entropy": mean(tally.entropy.summary()), "label_in_set_share": tally.label_report()["in_set_share"]}


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
    lines += _distribution_lines(report)
    if report.get("per_shard"):
        lines.append(f"{'shard':<34}{'rows':>7}{'tokens':>10}{'B/token':>9}{'ids/pos':>9}{'captured':>10}"
                     f"{'entropy':>9}{'in set':>8}")
        for s in report["per_shard"]:
            lines.append(f"{s['file']:<34}{s['rows']:>7,}{s['tokens']:>10,}{s['bytes_per_token']:>9.2f}"
                         f"{s['ids_per_position']:>9.1f}{s['captured_mass']:>10.4f}{s['entropy']:>9.3f}"
                         f"{s['label_in_set_share']:>8.3f}")
    return "\n".join(lines)


def _distribution_lines(report: dict) -> list[str]:
    k, c, h, lab = report["ids_per_position"], report["captured_mass"], report["entropy"], report["label"]
    if not k["count"]:
        return ["no target positions"]
    r = lab["rank_in_set"]
    lines = [
        f"ids/position mean {k['mean']:.1f}  min {k['min']}  p10 {k['p10']}  p50 {k['p50']}  p90 {k['p90']}  "
        f"max {k['max']}",
        f"captured     mean {c['mean']:.4f}  min {c['min']:.4f}  p10 {c['p10']:.4f}  p50 {c['p50']:.4f}  "
        f"p90 {c['p90']:.4f}   (1 - rest mass)",
        f"entropy      mean {h['mean']:.3f}  p10 {h['p10']:.3f}  p50 {h['p50']:.3f}  p90 {h['p90']:.3f}  "
        f"max {h['max']:.3f} nats",
        f"next token   in the stored set {lab['in_set_share']:.1%}, outside {lab['out_of_set_share']:.1%}",
    ]
    if r["count"]:
        lines.append(f"  rank in set mean {r['mean']:.2f}  p50 {r['p50']}  p90 {r['p90']}  p99 {r['p99']}  "
                     f"max {r['max']}  (1 = the teacher's top id)")
    return lines
