"""Corrupted caches for tools/faults.py: mutations of shards and manifests, and the worker that reads them.

Each case copies a sound cache (manifest + shards), damages it one way, and has a worker process read it
three ways: the reader (``Cache.open`` + every batch of every shard), ``verify_cache`` and
``verify_cache(deep=True)``. The worker runs in its own process with a per-case timeout, so a segfault
is a counted crash and a loop is a counted hang, not the end of the campaign.

Outcomes per path: ``caught`` (a teachercache error whose text names the damaged file), ``unnamed`` (a
teachercache error that does not name it), ``same`` (read without error, exactly the sound values),
``silent`` (read without error, different values), ``crash`` (any other exception, or a signal) and
``hang`` (no answer within the timeout).

Shard cases run twice: with the shard checksums (what every reader does by default) and as the decoder
alone sees them (``Cache.open(..., verify_checksums=False)`` for the reader; for verify, a copy whose
manifest was "resealed" with the damaged file's new size and SHA-256, as a hostile writer would do).

    python tools/fault_fuzz.py --worker     # one JSON request per line on stdin, one answer per line
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = "manifest.json"
HUGE = [1 << 62, (1 << 63) - 1, -1, -(1 << 62), 1 << 40, 1 << 31, (1 << 31) - 1, 0xFFFFFFFF]


# ---------------------------------------------------------------------------------------------------
# Reading a cache in the worker.


def batch_digest(h, batch) -> None:
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, dict):
            for layer in sorted(value):
                h.update(f"{f.name}.{layer}".encode())
                h.update(value[layer].tobytes())
        elif value is not None:
            h.update(f.name.encode())
            h.update(str(value.dtype).encode())
            h.update(value.tobytes())


def cache_digest(path, verify_checksums: bool = True) -> str:
    """SHA-256 over every decoded value of every shard (shards in file-name order, so a manifest whose
    list was merely reordered reads as the same cache)."""
    from teachercache.format.cache import Cache

    cache = Cache.open(path, verify_checksums=verify_checksums)
    parts = []
    for i in range(len(cache.shards)):
        h = hashlib.sha256()
        for batch in cache.iter_batches(shards=[i]):
            batch_digest(h, batch)
        parts.append((cache.shards[i].file, h.hexdigest()))
    return hashlib.sha256(json.dumps(sorted(parts)).encode()).hexdigest()


def _error_outcome(e: BaseException, targets: list[str]) -> dict:
    from teachercache.errors import TeachercacheError

    text = str(e)
    if isinstance(e, TeachercacheError):
        kind = "caught" if any(t in text for t in targets) else "unnamed"
    else:
        kind = "crash"
    return {"outcome": kind, "error": type(e).__name__, "message": text[:300]}


def read_path(path: str, verify_checksums: bool, targets: list[str], expected: str | None) -> dict:
    try:
        digest = cache_digest(path, verify_checksums)
    except Exception as e:  # noqa: BLE001 - classifying every exception is the point
        return _error_outcome(e, targets)
    return {"outcome": "same" if digest == expected else "silent", "digest": digest}


def verify_path(path: str, deep: bool, targets: list[str]) -> dict:
    from teachercache.inspect.verify import verify_cache

    try:
        faults = verify_cache(path, deep=deep)
    except Exception as e:  # noqa: BLE001
        return _error_outcome(e, targets)
    if not faults:
        return {"outcome": "clean"}
    text = "\n".join(str(f) for f in faults)
    named = any(t in text for t in targets)
    return {"outcome": "caught" if named else "unnamed", "error": "Fault", "message": text[:300],
            "faults": len(faults)}


def worker() -> None:
    """Answer requests {"op": "read"|"verify", ...} one per line until stdin closes."""
    import resource

    limit = 24 << 30  # a hostile length must fail an allocation, not take the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "read":
            out = read_path(req["path"], req["checksums"], req["targets"], req.get("expected"))
        else:
            out = verify_path(req["path"], req["deep"], req["targets"])
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------
# The worker pool (parent side).


class Pool:
    """``jobs`` worker processes; ``run(requests)`` answers each request or records a crash/hang."""

    def __init__(self, jobs: int, timeout: float, env: dict):
        self.jobs, self.timeout, self.env = jobs, timeout, env
        self.workers = [self._spawn() for _ in range(jobs)]

    def _spawn(self):
        return subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)

    def run(self, requests: list[dict], timeout: float | None = None) -> list[dict]:
        """Answers in the order of ``requests``, spread over the workers."""
        timeout = timeout or self.timeout
        answers: list[dict | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (request index, deadline)
        while pending or busy:
            for slot in range(self.jobs):
                if slot not in busy and pending:
                    i = pending.pop(0)
                    try:
                        self.workers[slot].stdin.write(json.dumps(requests[i]) + "\n")
                        self.workers[slot].stdin.flush()
                    except BrokenPipeError:
                        self._restart(slot)
                        pending.insert(0, i)
                        continue
                    busy[slot] = (i, time.time() + timeout)
            fds = {self.workers[s].stdout.fileno(): s for s in busy}
            wait = max(0.0, min(d for _, d in busy.values()) - time.time())
            ready, _, _ = select.select(list(fds), [], [], wait)
            for fd in ready:
                slot = fds[fd]
                i, _ = busy.pop(slot)
                line = self.workers[slot].stdout.readline()
                if line:
                    answers[i] = json.loads(line)
                else:  # the worker died: a crash (a signal, or an exit from native code)
                    code = self.workers[slot].wait()
                    answers[i] = {"outcome": "crash", "error": f"worker exit {code}", "message": ""}
                    self._restart(slot)
            now = time.time()
            for slot, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(slot)
                    answers[i] = {"outcome": "hang", "error": "timeout", "message": f"{timeout:.0f} s"}
                    self._restart(slot)
        return answers

    def _restart(self, slot: int) -> None:
        proc = self.workers[slot]
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.workers[slot] = self._spawn()

    def close(self) -> None:
        for proc in self.workers:
            proc.stdin.close()
            proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------
# Arrow IPC structure, found with pyarrow's own message reader (no flatbuffer parsing of our own).


def ipc_messages(data: bytes) -> list[tuple[int, int, int, str]]:
    """(start, metadata length, body length, type) of each message of an Arrow IPC stream."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    reader = pa.BufferReader(pa.py_buffer(data))
    out = []
    while True:
        start = reader.tell()
        try:
            m = ipc.read_message(reader)
        except (EOFError, OSError, pa.ArrowException):
            return out
        out.append((start, m.metadata.size, m.body.size if m.body is not None else 0, m.type))


def _put_int(data: bytearray, at: int, fmt: str, value: int) -> None:
    lo, hi = {"<q": (-(1 << 63), (1 << 63) - 1), "<i": (-(1 << 31), (1 << 31) - 1)}[fmt]
    struct.pack_into(fmt, data, at, max(lo, min(hi, value)))


# ---------------------------------------------------------------------------------------------------
# Mutations. Each takes (case dir, rng, shard files) and returns (kind, damaged files, what was done).


def _shard(case: Path, rng: random.Random, shards: list[str]) -> Path:
    return case / rng.choice(shards)


def m_flip(case, rng, shards):
    p = _shard(case, rng, shards)
    data = bytearray(p.read_bytes())
    n = rng.choice([1, 1, 2, 8])
    for _ in range(n):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    p.write_bytes(bytes(data))
    return "byte flip", [p], f"{n} bit(s) flipped"


def m_truncate(case, rng, shards):
    p = _shard(case, rng, shards)
    data = p.read_bytes()
    cut = rng.choice([0, rng.randrange(1, 16), rng.randrange(len(data)), len(data) - rng.randrange(1, 20)])
    p.write_bytes(data[:max(0, cut)])
    return "truncation", [p], f"cut to {max(0, cut)} of {len(data)} bytes"


def m_zero_page(case, rng, shards):
    p = _shard(case, rng, shards)
    data = bytearray(p.read_bytes())
    page = rng.randrange((len(data) + 4095) // 4096)
    data[page * 4096:(page + 1) * 4096] = bytes(len(data[page * 4096:(page + 1) * 4096]))
    p.write_bytes(bytes(data))
    return "zeroed 4 KiB page", [p], f"page {page}"


def m_garbage_tail(case, rng, shards):
    p = _shard(case, rng, shards)
    with open(p, "ab") as f:
        f.write(rng.randbytes(rng.randrange(1, 5000)))
    return "trailing garbage", [p], "random bytes appended"


def m_swap(case, rng, shards):
    if len(shards) < 2:
        return m_flip(case, rng, shards)
    a, b = rng.sample(shards, 2)
    pa_, pb = case / a, case / b
    da, db = pa_.read_bytes(), pb.read_bytes()
    pa_.write_bytes(db)
    pb.write_bytes(da)
    return "swapped shards", [pa_, pb], f"{a} <-> {b}"


def m_wrong_type(case, rng, shards):
    p = _shard(case, rng, shards)
    what = rng.choice(["empty", "directory", "fifo", "parquet", "json", "symlink-out", "symlink-in-dir"])
    p.unlink()
    if what == "empty":
        p.write_bytes(b"")
    elif what == "directory":
        p.mkdir()
    elif what == "fifo":
        os.mkfifo(p)
    elif what == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"input_ids": [[1, 2, 3]]}), p)
    elif what == "json":
        p.write_text('{"not": "a shard"}')
    elif what == "symlink-out":
        os.symlink("/etc/hostname", p)
    else:
        os.symlink(".", p)
    return "wrong file type", [p], what


def m_stream_end(case, rng, shards):
    """The 8-byte end-of-stream marker (continuation 0xFFFFFFFF + length 0): cut off, or given a length."""
    p = _shard(case, rng, shards)
    data = bytearray(p.read_bytes())
    if rng.random() < 0.3:
        p.write_bytes(bytes(data[:-8]))
        return "end of stream", [p], "end-of-stream marker cut off"
    value = rng.choice(HUGE + [8, len(data)])
    _put_int(data, len(data) - 4, "<i", value)
    p.write_bytes(bytes(data))
    return "end of stream", [p], f"end-of-stream length {value}"


def m_message_length(case, rng, shards):
    p = _shard(case, rng, shards)
    data = bytearray(p.read_bytes())
    start, meta, body, kind = rng.choice(ipc_messages(bytes(data)))
    value = rng.choice(HUGE + [meta + 8, meta - 8, len(data)])
    _put_int(data, start + 4, "<i", value)
    p.write_bytes(bytes(data))
    return "huge length: message", [p], f"{kind} metadata length {value}"


def m_metadata_int(case, rng, shards):
    """An int64 of a record batch's flatbuffer metadata that looks like a length, an offset or a row count
    (FieldNode lengths, Buffer offsets/lengths, RecordBatch.length, bodyLength) set to a hostile value."""
    p = _shard(case, rng, shards)
    data = bytearray(p.read_bytes())
    batches = [m for m in ipc_messages(bytes(data)) if m[3] == "record batch"]
    start, meta, body, _ = rng.choice(batches)
    lo, hi = start + 8, start + 8 + meta
    candidates = [a for a in range(lo, hi - 7, 4) if 0 < struct.unpack_from("<q", data, a)[0] <= max(body, 1) * 8]
    at = rng.choice(candidates)
    old = struct.unpack_from("<q", data, at)[0]
    value = rng.choice(HUGE + [old + 1, old - 1, old * 2, old + 8, 0])
    _put_int(data, at, "<q", value)
    p.write_bytes(bytes(data))
    return "huge length: batch metadata", [p], f"int64 {old} at {at} -> {value}"


def m_zstd_length(case, rng, shards):
    """The 8-byte uncompressed length in front of a compressed Arrow buffer."""
    p = _shard(case, rng, shards)
    data = bytearray(p.read_bytes())
    frames = [i - 8 for i in range(len(data)) if data[i:i + 4] == b"\x28\xb5\x2f\xfd" and i >= 8]
    at = rng.choice(frames)
    old = struct.unpack_from("<q", data, at)[0]
    value = rng.choice(HUGE + [old + 1, old - 1, old * 2, 0, 1 << 33])
    _put_int(data, at, "<q", value)
    p.write_bytes(bytes(data))
    return "huge length: buffer", [p], f"uncompressed length {old} -> {value}"


def m_schema_metadata(case, rng, shards):
    """An equal-length edit of the schema metadata (format version, layout JSON)."""
    p = _shard(case, rng, shards)
    data = p.read_bytes()
    old, new = rng.choice([(b'"vocab_size": 8192', b'"vocab_size": 9999'), (b'"vocab_size": 8192', b'"vocab_size": 0001'),
                           (b'"vocab_size": 8192', b'"vocab_size": -192'), (b'"sampled": false', b'"sampled": 0    '),
                           (b'"hidden_width": 0', b'"hidden_width": 9'), (b'"steps": [', b'"steps":[['),
                           (b'teachercache', b'teachercachx')])
    if old not in data:
        return m_flip(case, rng, shards)
    p.write_bytes(data.replace(old, new))
    return "schema metadata edit", [p], f"{old.decode()} -> {new.decode()}"


SHARD_MUTATIONS = [m_flip, m_flip, m_truncate, m_zero_page, m_garbage_tail, m_swap, m_wrong_type,
                   m_stream_end, m_message_length, m_metadata_int, m_metadata_int, m_zstd_length,
                   m_zstd_length, m_schema_metadata]


def _json_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _json_paths(v, prefix + (i,))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _delete(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


HOSTILE_VALUES = [None, "", "x", -1, 0, 1, 2**63, 10**30, 1e308, -0.5, True, [], {}, [1], {"a": 1}, "../x",
                  float("nan"), float("inf"), "8192"]
TRAVERSALS = ["../outside.arrow", "/etc/hostname", "shards/../../outside.arrow", "shards/\x00.arrow",
              "shards\\..\\..\\x.arrow", "", ".", "shards", "shards/", "~/x.arrow", "shards/../manifest.json",
              "//etc/hostname", "shards/part-r000-00000.arrow/../../..", "shards/%2e%2e/x.arrow", "C:\\x.arrow"]


def m_manifest_json(case, rng, shards):
    m = case / MANIFEST
    raw = json.loads(m.read_text())
    action = rng.choice(["value", "value", "value", "delete", "unknown", "traversal", "traversal", "huge",
                         "version", "reorder", "symlink-shard"])
    if action == "value":
        path = rng.choice(list(_json_paths(raw)))
        value = rng.choice(HOSTILE_VALUES)
        _set(raw, path, value)
        what = f"{'.'.join(map(str, path))} = {value!r:.40}"
    elif action == "delete":
        path = rng.choice(list(_json_paths(raw)))
        _delete(raw, path)
        what = f"deleted {'.'.join(map(str, path))}"
    elif action == "unknown":
        path = rng.choice([p for p in _json_paths(raw) if isinstance(_get(raw, p), dict)] + [()])
        _get(raw, path)["surprise"] = 1
        what = f"unknown field under {'.'.join(map(str, path)) or 'top'}"
    elif action == "traversal":
        i = rng.randrange(len(raw["shards"]))
        raw["shards"][i]["file"] = rng.choice(TRAVERSALS)
        what = f"shards[{i}].file = {raw['shards'][i]['file']!r}"
    elif action == "huge":
        i = rng.randrange(len(raw["shards"]))
        key = rng.choice(["bytes", "rows", "tokens", "target_positions", "target_entries"])
        raw["shards"][i][key] = rng.choice([2**62, 2**63 - 1, 10**40])
        if rng.random() < 0.5:
            raw["totals"][key] = sum(s[key] for s in raw["shards"])
        what = f"shards[{i}].{key} huge"
    elif action == "version":
        from teachercache.format.schema import FORMAT_VERSION as v

        raw["format_version"] = rng.choice([v + 1, v - 1, 0, str(v), float(v), True, None, 99])
        what = f"format_version = {raw['format_version']!r}"
    elif action == "reorder":
        raw["shards"].reverse()
        what = "shard list reversed (harmless)"
    else:
        i = rng.randrange(len(raw["shards"]))
        link = case / "shards" / "link.arrow"
        os.symlink("/etc/hostname", link)
        raw["shards"][i]["file"] = "shards/link.arrow"
        what = "shard entry is a symlink out of the cache"
    m.write_text(json.dumps(raw))
    return f"manifest: {action}", [m], what


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def m_manifest_bytes(case, rng, shards):
    m = case / MANIFEST
    data = bytearray(m.read_bytes())
    action = rng.choice(["flip", "truncate", "zero", "binary", "directory", "empty", "fifo"])
    if action == "flip":
        for _ in range(rng.choice([1, 3])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        m.write_bytes(bytes(data))
    elif action == "truncate":
        m.write_bytes(bytes(data[:rng.randrange(len(data))]))
    elif action == "zero":
        m.write_bytes(bytes(len(data)))
    elif action == "binary":
        m.write_bytes(rng.randbytes(len(data)))
    else:
        m.unlink()
        if action == "directory":
            m.mkdir()
        elif action == "empty":
            m.write_bytes(b"")
        else:
            os.mkfifo(m)
    return f"manifest: bytes {action}", [m], action


def make_case(sound: Path, case: Path, rng: random.Random):
    """Copy ``sound`` (manifest + shards) to ``case`` and damage it. Returns (kind, targets, what)."""
    shutil.rmtree(case, ignore_errors=True)
    (case / "shards").mkdir(parents=True)
    shutil.copy(sound / MANIFEST, case / MANIFEST)
    shards = []
    for s in json.loads((sound / MANIFEST).read_text())["shards"]:
        shutil.copy(sound / s["file"], case / s["file"])
        shards.append(s["file"])
    mutate = rng.choice(SHARD_MUTATIONS + [m_manifest_json] * 5 + [m_manifest_bytes] * 2)
    kind, targets, what = mutate(case, rng, shards)
    return kind, [str(t) for t in targets], what


def reseal(case: Path, sealed: Path, targets: list[str]) -> bool:
    """A copy of ``case`` whose manifest carries the damaged shards' new sizes and SHA-256 (what a hostile
    writer would do), or False when that is not possible (the damage is not to regular shard files)."""
    shutil.rmtree(sealed, ignore_errors=True)
    if not all(Path(t).is_file() and not Path(t).is_symlink() for t in targets):
        return False
    shutil.copytree(case, sealed, symlinks=True)
    raw = json.loads((sealed / MANIFEST).read_text())
    for s in raw["shards"]:
        p = sealed / s["file"]
        if str(case / s["file"]) in targets:
            s["bytes"] = p.stat().st_size
            s["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    raw["totals"]["bytes"] = sum(s["bytes"] for s in raw["shards"])
    (sealed / MANIFEST).write_text(json.dumps(raw))
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        sys.exit("run tools/faults.py; this module's --worker is started by it")
