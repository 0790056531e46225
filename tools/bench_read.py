"""Benchmark of the training reader from object storage: target positions per second that CacheDataset delivers
(shards read, decoded, rows cut and shuffled: what a training step waits on) from the local disk and from an S3
endpoint, the same cache, side by side in one run.

The S3 endpoint is moto's server (tools/local_s3.py) in a subprocess on 127.0.0.1: real HTTP, real s3fs, but no
network between them, so what this measures is the reader's own overhead (the prefetch workers, the streaming
SHA-256, the pipeline) against local reads, not a cloud's bandwidth. The cache is the demo teacher's top-64 over
80 documents of the demo corpus in 2 MB shards, built once (or --cache), uploaded object by object. Each reading
is one epoch of CacheDataset(shuffle=True) after it was opened (opening is timed apart); the rounds alternate the
readers and the median of each is kept, with the CPU seconds the epoch cost the reader, the prefetch worker
processes and the server. S3 is read without a shard cache (every shard downloaded during the epoch, a temporary
directory keeps only those in use), at the default prefetch (2 shards ahead) and with none.

    python tools/bench_read.py                  # ~3 minutes on 2 cores (builds the cache first)
    python tools/bench_read.py --cache /tmp/c   # an existing local cache
The last line printed is one JSON object with the figures. DESIGN.md §5's target: S3 / local >= 0.8 at the
default prefetch. Run it alone (load average < 1.5): the reader and the server share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from local_s3 import LocalS3  # noqa: E402

from teachercache.format.cache import Cache  # noqa: E402
from teachercache.format.manifest import TargetSpec  # noqa: E402
from teachercache.format.mirror import DEFAULT_PREFETCH_SHARDS  # noqa: E402
from teachercache.student.dataset import CacheDataset  # noqa: E402
from teachercache.teacher.build import BuildOptions, build_cache  # noqa: E402
from teachercache.teacher.corpus import DataOptions  # noqa: E402


def build(out: Path, corpus: str, docs: int, shard_mb: float) -> None:
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(out), batch_size=8, progress=False,
                             targets=TargetSpec(kind="topk", k=64), shard_bytes=int(shard_mb * (1 << 20)),
                             data=DataOptions(paths=(corpus,), seq_len=256, max_docs=docs)))


def upload(local: Path, s3: LocalS3, prefix: str) -> str:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.fs.put_file(str(path), f"{s3.bucket}/{prefix}/{path.relative_to(local).as_posix()}")
    return s3.url(prefix)


def cpu_seconds(pids) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def children() -> list[int]:
    """This process's child processes (the prefetch workers, the S3 server)."""
    me, out = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                out.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass
    return out


def epoch(location: str, server: int, **kwargs) -> tuple[float, float, int, dict]:
    """(seconds to open, seconds of one shuffled epoch, target positions delivered, CPU seconds of the epoch
    in this process, the prefetch workers and the S3 server)."""
    t0 = time.perf_counter()
    dataset = CacheDataset(location, shuffle=True, seed=0, **kwargs)
    t1 = time.perf_counter()
    workers = [pid for pid in children() if pid != server]
    before = (time.process_time(), cpu_seconds(workers), cpu_seconds([server]))
    positions = 0
    for row in dataset:
        positions += len(row["target_offsets"]) - 1
    took = time.perf_counter() - t1
    workers = [pid for pid in children() if pid != server]
    after = (time.process_time(), cpu_seconds(workers), cpu_seconds([server]))
    cpu = {k: a - b for k, a, b in zip(("reader", "workers", "server"), after, before)}
    return t1 - t0, took, positions, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help="an existing local cache (default: build one)")
    parser.add_argument("--corpus", default=str(ROOT / "data" / "corpus" / "train.parquet"))
    parser.add_argument("--docs", type=int, default=80, help="documents of the built cache")
    parser.add_argument("--shard-mb", type=float, default=2.0, help="shard size of the built cache")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}" + ("  (busy machine: the figures are noisy)" if load >= 1.5 else ""))
    with tempfile.TemporaryDirectory(prefix="tc-bench-read-") as work:
        local = Path(args.cache) if args.cache else Path(work) / "cache"
        if not args.cache:
            t = time.time()
            build(local, args.corpus, args.docs, args.shard_mb)
            print(f"built {local} in {time.time() - t:.0f} s")
        m = Cache.open(local).manifest
        print(f"cache: {len(m.shards)} shards, {m.totals.bytes / 1e6:.1f} MB, {m.totals.target_positions:,} target "
              f"positions ({m.totals.bytes / m.totals.target_positions:.1f} bytes each)")
        with LocalS3("bench") as s3:
            url = upload(local, s3, "cache")
            variants = {"local": (str(local), {}),
                        f"s3_prefetch{DEFAULT_PREFETCH_SHARDS}": (url, {}),
                        "s3_prefetch0": (url, {"prefetch_shards": 0})}
            server = s3.proc.pid
            epoch(str(local), server)  # warm-up: numba compiles, the page cache holds the local shards, workers start
            epoch(url, server)
            seconds = {name: [] for name in variants}
            opens = {name: [] for name in variants}
            cpus = {name: [] for name in variants}
            for r in range(args.rounds):
                for name, (where, kwargs) in variants.items():
                    opened, took, positions, cpu = epoch(where, server, **kwargs)
                    assert positions == m.totals.target_positions, (name, positions)
                    seconds[name].append(took)
                    opens[name].append(opened)
                    cpus[name].append(cpu)
                print(f"round {r + 1}: " + ", ".join(f"{n} {m.totals.target_positions / s[-1] / 1e6:.3f} M/s"
                                                     for n, s in seconds.items()))
    rate = {name: m.totals.target_positions / statistics.median(s) for name, s in seconds.items()}
    cpu = {name: {k: statistics.median(c[k] for c in cs) for k in cs[0]} for name, cs in cpus.items()}
    print(f"{'reader':<16} {'positions/s':>12} {'÷ local':>8} {'open (s)':>9} {'epoch (s)':>9}  CPU s of the epoch: "
          "reader / prefetch workers / S3 server")
    for name in variants:
        c = cpu[name]
        print(f"{name:<16} {rate[name]:>12,.0f} {rate[name] / rate['local']:>8.3f} "
              f"{statistics.median(opens[name]):>9.3f} {statistics.median(seconds[name]):>9.3f}  "
              f"{c['reader']:.2f} / {c['workers']:.2f} / {c['server']:.2f}")
    figures = {"load_average": round(load, 2), "shards": len(m.shards), "cache_bytes": m.totals.bytes,
               "target_positions": m.totals.target_positions, "rounds": args.rounds,
               **{f"{n}_positions_per_s": round(v) for n, v in rate.items()},
               **{f"{n}_ratio": round(v / rate["local"], 3) for n, v in rate.items() if n != "local"},
               **{f"{n}_open_s": round(statistics.median(opens[n]), 3) for n in variants},
               **{f"{n}_cpu_s": {k: round(v, 2) for k, v in cpu[n].items()} for n in variants},
               "target_ratio": 0.8}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
