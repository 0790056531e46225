"""`teachercache diff`: how far apart are two caches of the same rows (two teachers, two target kinds,
two k, a cache and its re-quantised copy)?

Per target position, KL(A || B) between the two caches' stored distributions over the union of their
stored ids plus one bucket for the rest (each cache's rest mass spread evenly over its unstored ids): a
lower bound of the KL between the full distributions, and the (k+1)-bucket KL when the stored sets are
equal. Summarised by mean, max and streaming p50/p99; rows ranked by mean KL. docs/inspect.md has the
exact convention.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass

import numpy as np

from teachercache.errors import TeachercacheError
from teachercache.format.cache import Cache
from teachercache.inspect.report import Histogram
from teachercache.inspect.rows import CacheRow, iter_cache_rows

PROB_FLOOR = 1e-12
KL_EDGES = np.concatenate([[0.0], np.geomspace(1e-9, 1e3, 2400)])
"""Bins of the per-position KL histogram (nats): 0, then log-spaced from 1e-9 to 1e3."""


class DiffError(TeachercacheError):
    """Two caches that cannot be compared position by position."""


@dataclass(frozen=True)
class DiffOptions:
    worst: int = 10
    """How many rows to list, those with the largest mean KL."""


def position_kl(a: CacheRow, b: CacheRow, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(token indices, KL(A||B) per position) over the positions where both rows hold a target (see the
    module docstring for the convention)."""
    both = a.target_mask & b.target_mask
    ja = np.flatnonzero(both[a.target_mask])  # index among A's positions
    jb = np.flatnonzero(both[b.target_mask])
    n = len(ja)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    ea, pa = _entries(a, ja)
    eb, pb = _entries(b, jb)
    V = np.int64(vocab_size)
    key_a = ea[0] * V + a.ids[ea[1]].astype(np.int64)
    key_b = eb[0] * V + b.ids[eb[1]].astype(np.int64)
    union = np.union1d(key_a, key_b)  # sorted (position, id) keys
    pos_u = union // V
    size_u = np.bincount(pos_u, minlength=n)
    rest_a = np.asarray(a.rest_mass, np.float64)[ja]
    rest_b = np.asarray(b.rest_mass, np.float64)[jb]
    size_a = np.bincount(ea[0], minlength=n)
    size_b = np.bincount(eb[0], minlength=n)
    # an id a cache did not store gets its rest mass spread evenly over its unstored ids
    qa = _on_union(union, key_a, pa, rest_a / np.maximum(V - size_a, 1), pos_u)
    qb = _on_union(union, key_b, pb, rest_b / np.maximum(V - size_b, 1), pos_u)
    bucket_a = rest_a * (V - size_u) / np.maximum(V - size_a, 1)
    bucket_b = rest_b * (V - size_u) / np.maximum(V - size_b, 1)
    za = np.bincount(pos_u, qa, minlength=n) + bucket_a
    zb = np.bincount(pos_u, qb, minlength=n) + bucket_b
    qa, bucket_a = qa / za[pos_u], bucket_a / za
    qb, bucket_b = np.maximum(qb / zb[pos_u], PROB_FLOOR), np.maximum(bucket_b / zb, PROB_FLOOR)
    kl = np.bincount(pos_u, _xlogy(qa, qa / qb), minlength=n) + _xlogy(bucket_a, bucket_a / bucket_b)
    return a.positions[ja], np.maximum(kl, 0.0)


def _entries(row: CacheRow, js: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """((compact position index, entry index) per entry of the chosen positions, probabilities)."""
    sizes = (row.offsets[js + 1] - row.offsets[js]).astype(np.int64)
    compact = np.repeat(np.arange(len(js)), sizes)
    starts = np.repeat(row.offsets[js], sizes)
    within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    entry = (starts + within).astype(np.int64)
    return (compact, entry), np.exp(np.asarray(row.logprobs, np.float64)[entry])


def _on_union(union, keys, probs, fill, pos_u) -> np.ndarray:
    out = fill[pos_u].copy()
    out[np.searchsorted(union, keys)] = probs
    return out


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


def diff_caches(path_a: str | os.PathLike, path_b: str | os.PathLike, options: DiffOptions = DiffOptions()) -> dict:
    """A JSON-ready report of KL(A||B) per position over two caches of the same rows."""
    a, b = Cache.open(path_a), Cache.open(path_b)
    if a.manifest.totals.rows != b.manifest.totals.rows:
        raise DiffError(f"{path_a} holds {a.manifest.totals.rows} rows and {path_b} holds "
                        f"{b.manifest.totals.rows}: diff compares caches built over the same rows")
    if a.layout.vocab_size != b.layout.vocab_size or a.manifest.tokenizer.fingerprint != b.manifest.tokenizer.fingerprint:
        raise DiffError(f"{path_a} and {path_b} come from different tokenizers (manifest field "
                        "tokenizer.fingerprint): their ids do not name the same tokens")
    hist = Histogram(KL_EDGES)
    worst: list[tuple[float, int, float, int]] = []
    compared = 0
    for ra, rb in zip(iter_cache_rows(a), iter_cache_rows(b)):
        if not np.array_equal(ra.input_ids, rb.input_ids):
            raise DiffError(f"row {ra.index}: input_ids differ between {path_a} ({a.shards[ra.shard].file}) "
                            f"and {path_b} ({b.shards[rb.shard].file}); diff compares caches of the same rows "
                            "(same data, seq_len and packing)")
        tokens, kl = position_kl(ra, rb, a.layout.vocab_size)
        hist.add(kl)
        compared += len(kl)
        if len(kl):
            item = (float(kl.mean()), ra.index, float(kl.max()), int(tokens[int(kl.argmax())]))
            heapq.heappush(worst, item) if len(worst) < options.worst else heapq.heappushpop(worst, item)
    s = hist.summary()
    summary = {"positions": compared, **({k: s[k] for k in ("mean", "p50", "p99", "max")} if compared else {})}
    return {"a": str(path_a), "b": str(path_b), "kl": summary,
            "convention": "KL(A||B) over the union of stored ids plus a rest bucket; an id stored by one cache "
                          "only gets the other's rest mass spread evenly over its unstored ids",
            "worst_rows": [{"row": r, "mean_kl": m, "max_kl": mx, "max_at_position": t}
                           for m, r, mx, t in sorted(worst, reverse=True)]}


def format_diff(report: dict) -> str:
    k = report["kl"]
    lines = [f"KL(A||B)  A = {report['a']}  B = {report['b']}", f"positions compared {k['positions']:,}"]
    if k["positions"]:
        lines.append(f"KL nats   mean {k['mean']:.5f}  p50 {k['p50']:.5f}  p99 {k['p99']:.5f}  max {k['max']:.5f}")
        lines.append(f"{'row':>8}{'mean KL':>12}{'max KL':>12}  at position")
        lines += [f"{w['row']:>8}{w['mean_kl']:>12.5f}{w['max_kl']:>12.5f}  {w['max_at_position']}"
                  for w in report["worst_rows"]]
    return "\n".join(lines)
