"""`teachercache verify`: is a cache sound? Format-level checks (the deep, row-by-row half comes later).

Checks, each reported as a Fault naming the file: the manifest parses, has a known version and paths that
stay inside the cache; every shard exists, has the manifest's size and SHA-256, the expected schema and
layout, and the rows/tokens/positions/entries the manifest claims. Nothing stops at the first fault except
an unreadable manifest (without it there is nothing to check against).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema as S
from .cache import Cache
from .errors import CacheError
from .manifest import SHARDS_DIR


@dataclass(frozen=True)
class Fault:
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


def verify_cache(path: str | os.PathLike) -> list[Fault]:
    """Every fault found in the cache at ``path``; an empty list means it is sound."""
    try:
        cache = Cache.open(path)
    except CacheError as e:
        return [Fault(e.path, e.problem)]
    faults = []
    for i, info in enumerate(cache.shards):
        try:
            cache.check_shard(i)
            faults += _check_counts(cache, i)
        except CacheError as e:
            faults.append(Fault(e.path, e.problem))
    listed = {cache.shard_path(i).name for i in range(len(cache.shards))}
    shard_dir = Path(path) / SHARDS_DIR
    if shard_dir.is_dir():
        for extra in sorted(p.name for p in shard_dir.iterdir() if p.name.endswith(".arrow")):
            if extra not in listed:
                faults.append(Fault(str(shard_dir / extra), "shard file is not listed in the manifest"))
    return faults


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
