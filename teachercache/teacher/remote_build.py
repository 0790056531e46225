"""`teachercache build --out URL`: a build into object storage (s3://, gs://, hf://, any fsspec protocol).

The build runs as a local one (teacher.build), into a local *staging* directory that stands for the URL (one per
URL and rank: ``$TEACHERCACHE_STAGING`` or the system's temporary directory, then ``teachercache-staging/``), and
each file is published to the URL as soon as it is complete (``RemoteOut.publish``):

* a shard is written and closed in staging (format.shards: temporary name, fsync, rename), uploaded whole, then
  deleted locally: staging holds one shard per rank at a time;
* ``state/rank-RRR.json`` (the resume state) is uploaded after the shard it lists, so the URL never has a state
  that names a shard it lacks;
* the marker, ``tokenizer/``, ``skipped.jsonl``, ``config.yaml`` as they are written;
* ``manifest.json`` last, as ONE object (one PUT): object stores have no rename, but an object appears whole or
  not at all, so a reader that finds the manifest finds a complete cache.

``--resume`` works as on a local directory: before the build, staging is filled from the URL (the marker, the
manifest, every rank's state file), so the build decides new / resume / overwrite by the same rules; a rank's
shards are checked at the URL (each one its state lists must be there with its size; their SHA-256 is checked
by every reader as they stream down, and by ``verify``), and a shard object the state does not list (uploaded
by a build killed before it recorded it) is deleted and written again, identically.

Two builds into one URL. A lock on object storage cannot be atomic (there is no create-if-absent that every
store and fsspec offer), so what protects a build is:

* on one machine: the staging directory's lock (flock), as for a local directory: a second build into the same
  URL from the same machine is refused, always;
* across machines: a lock object, ``state/rank-RRR.lock``, holding the owner's host, process, a random token and
  the time. A build refuses to start while another host's lock is fresher than LOCK_STALE_SECONDS; it writes its
  own and reads it back (the last writer wins, and the loser sees the winner's token and stops); it refreshes it
  every LOCK_REFRESH_SECONDS and checks before every upload that the token is still its own, and reads it once
  more before it writes the manifest. A lock left by a build killed on this machine is stale at once (its
  staging lock is free); one left on another machine after LOCK_STALE_SECONDS without a refresh.

What does not protect: two machines that start within the same round trip can both read "no lock", write, and
read back before the other writes (then both build; the shards are written by name, and a deterministic build
writes the same bytes, but the manifest is written twice); a build frozen longer than LOCK_STALE_SECONDS (a
suspended VM) may find its lock taken over and stop, having uploaded shards under names the other build writes
too; clocks that differ by more than LOCK_STALE_SECONDS misjudge staleness. Give each job its own --out (or
``--slice i/n`` parts) and none of this arises.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from teachercache.errors import CacheError, TeachercacheError
from teachercache.format.manifest import MANIFEST_NAME, SHARDS_DIR, STATE_DIR, TOKENIZER_DIR
from teachercache.format.outputs import MARKER
from teachercache.format.storage import Storage, open_storage

LOCK_REFRESH_SECONDS = 30.0
"""How often a build into a URL rewrites its lock object."""
LOCK_STALE_SECONDS = 180.0
"""A lock object of another machine not refreshed for this long is left by a build that is gone."""
STAGING_ENV = "TEACHERCACHE_STAGING"
"""Where staging directories go (default: the system's temporary directory)."""
MAX_SMALL_FILE = 1 << 29
"""The most bytes of a marker, manifest or state file read back from the URL."""
OWN = (MANIFEST_NAME, SHARDS_DIR, TOKENIZER_DIR, STATE_DIR, MARKER, "skipped.jsonl", "config.yaml")
"""What a build writes at its URL; nothing else there is touched."""

_STAGED: dict[str, "RemoteOut"] = {}
"""Staging directory (its path as a string) -> the RemoteOut it stands for, while a build runs."""


def staged(out: str | os.PathLike) -> "RemoteOut | None":
    """The RemoteOut that the directory ``out`` stages, or None: a local build."""
    return _STAGED.get(str(out))


def staging_path(url: str, rank: int) -> Path:
    """The staging directory of ``url`` for ``rank`` (the same every time, so that one machine's builds into
    one URL share it and its lock)."""
    base = Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir()) / "teachercache-staging"
    return base / f"{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}-r{rank:03d}"


def build_remote(options):
    """``build_cache`` of an ``options.out`` that is a URL (see the module docstring). Returns the BuildResult
    with ``manifest_path`` the manifest's URL."""
    from teachercache.teacher.build import BuildError, build_cache

    url = options.out.rstrip("/")
    rank = int(os.environ.get("RANK", "0"))
    try:
        storage = open_storage(url)
    except TeachercacheError as e:
        raise BuildError(f"--out {e}") from None
    staging = staging_path(url, rank)
    host_lock = _hold_host_lock(staging, url)
    remote = RemoteOut(url, storage, staging, rank)
    try:
        remote.lock.acquire()
        try:
            remote.fill_staging()
            _STAGED[str(staging)] = remote
            result = build_cache(dataclasses.replace(options, out=str(staging)))
        finally:
            _STAGED.pop(str(staging), None)
            remote.lock.release()
        shutil.rmtree(staging, ignore_errors=True)  # everything is at the URL now
    except TeachercacheError as e:
        raise _naming_url(e, staging, url) from None
    finally:
        host_lock.close()
    return dataclasses.replace(result, manifest_path=storage.location(MANIFEST_NAME))


def _naming_url(e: TeachercacheError, staging: Path, url: str) -> TeachercacheError:
    """The same error, naming the URL where it named the staging directory."""
    if isinstance(e, CacheError):
        return e.naming(str(staging), url)
    text = str(e)
    if str(staging) not in text:
        return e
    try:
        return type(e)(text.replace(str(staging), url))
    except TypeError:
        return e


def _hold_host_lock(staging: Path, url: str):
    """The flock of ``staging`` (beside it: the staging directory itself is filled afresh), held for the whole
    build: a second build into the URL from this machine is refused."""
    from teachercache.teacher.build import BuildError

    staging.parent.mkdir(parents=True, exist_ok=True)
    f = open(staging.with_name(staging.name + ".lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BuildError(f"{url}: another build is writing into this cache from this machine (its staging directory "
                         f"{staging} is locked); wait for it or choose another --out") from None
    return f


class RemoteOut:
    """The URL a staging directory stands for: what build.py's output paths call (``publish``, ``clear``,
    ``check_shards``, ``read_state``) when ``staged(out)`` finds one."""

    def __init__(self, url: str, storage: Storage, staging: Path, rank: int):
        self.url, self.storage, self.staging, self.rank = url, storage, staging, rank
        self.lock = RemoteLock(storage, rank, staging)

    def fill_staging(self) -> None:
        """Make staging what the URL holds, as far as the build's decisions look: the marker, the manifest and
        the state files (not the shards: ``check_shards`` asks the URL); refuse a URL holding objects that no
        build wrote."""
        from teachercache.teacher.build import BuildError

        if self.staging.exists():
            shutil.rmtree(self.staging)
        (self.staging / STATE_DIR).mkdir(parents=True)
        listing = self.storage.list("")
        foreign = sorted(set(listing) - set(OWN))
        states = {n: s for n, s in self.storage.list(STATE_DIR).items() if n.endswith(".json")}
        known = MARKER in listing or MANIFEST_NAME in listing or states
        if foreign and not known:
            shown = ", ".join(foreign[:5]) + (f", … ({len(foreign)} entries)" if len(foreign) > 5 else "")
            raise BuildError(f"{self.url}: not a teachercache cache but objects teachercache did not write ({shown}); "
                             "teachercache will not write into it, resume it or delete it: choose another --out")
        if (SHARDS_DIR in listing or TOKENIZER_DIR in listing) and not known:
            raise BuildError(f"{self.url}: holds shards/ or tokenizer/ but no marker, manifest or state: not a cache "
                             "this version can resume or replace; delete it or choose another --out")
        for name in (MARKER, MANIFEST_NAME):
            if name in listing:
                (self.staging / name).write_bytes(self.storage.read_bytes(name, MAX_SMALL_FILE))
        for name in states:
            state = self.storage.read_bytes(f"{STATE_DIR}/{name}", MAX_SMALL_FILE)
            (self.staging / STATE_DIR / name).write_bytes(state)

    def publish(self, relative: str) -> None:
        """Copy the staged file or directory ``relative`` to the URL, or delete it there when staging has none.
        A shard is deleted from staging once uploaded. The manifest is written only while the lock is ours."""
        self.lock.check(fresh=relative == MANIFEST_NAME)
        local = self.staging / relative
        if local.is_dir():
            self.storage.remove(relative)  # a directory is replaced whole (tokenizer/)
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                self.storage.put_file(path, f"{relative}/{path.relative_to(local).as_posix()}")
        elif local.is_file():
            self.storage.put_file(local, relative)
            if relative.startswith(f"{SHARDS_DIR}/"):
                local.unlink()
        else:
            self.storage.remove(relative)

    def clear(self) -> None:
        """--overwrite: delete what a build wrote at the URL (held lock objects stay), as build._clear does in
        staging."""
        self.lock.check()
        for name in OWN:
            if name != STATE_DIR:
                self.storage.remove(name)
        for name in self.storage.list(STATE_DIR):
            if not name.endswith(".lock"):
                self.storage.remove(f"{STATE_DIR}/{name}")

    def check_shards(self, rank: int, resume: bool) -> dict:
        """build._check_shards at the URL: the rank's resume state ({} for a fresh start); every shard it lists
        must be there with its size; the rank's other shard objects are deleted (and its staged leftovers)."""
        from teachercache.teacher.build import BuildError

        (self.staging / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        for leftover in (self.staging / SHARDS_DIR).glob(f"part-r{rank:03d}-*"):
            leftover.unlink()
        name = f"{STATE_DIR}/rank-{rank:03d}.json"
        state = self.read_state(rank) if resume else {}
        stored = self.storage.list(SHARDS_DIR)
        done = set()
        for s in state.get("shards", []):
            file = _shard_name(s["file"])
            done.add(file)
            where = self.storage.location(s["file"])
            if file not in stored:
                raise BuildError(f"{where}: missing, though {self.storage.location(name)} records it; rebuild with "
                                 "--overwrite")
            if stored[file] != s["bytes"]:
                raise BuildError(f"{where}: {stored[file]} bytes, {self.storage.location(name)} records {s['bytes']}; "
                                 "rebuild with --overwrite")
        for file in stored:
            if file.startswith(f"part-r{rank:03d}-") and file not in done:
                self.storage.remove(f"{SHARDS_DIR}/{file}")  # uploaded by a build killed before it recorded it
        return state

    def read_state(self, rank: int) -> dict:
        """Rank ``rank``'s state file, from the URL (rank 0 writes the manifest from every rank's)."""
        name = f"{STATE_DIR}/rank-{rank:03d}.json"
        try:
            return json.loads(self.storage.read_bytes(name, MAX_SMALL_FILE))
        except FileNotFoundError:
            return {}


def _shard_name(file: str) -> str:
    """The name of a manifest path under shards/ (state files list them as shards/NAME)."""
    return file.rpartition("/")[2]


def _age(held: dict) -> float:
    """Seconds since a lock object was last written (by its writer's clock); infinite when it does not say."""
    try:
        return time.time() - float(held.get("time"))
    except (TypeError, ValueError):
        return float("inf")


class RemoteLock:
    """The lock object of one rank at a URL (see the module docstring for what it protects)."""

    def __init__(self, storage: Storage, rank: int, staging: Path):
        self.storage, self.rank = storage, rank
        self.name = f"{STATE_DIR}/rank-{rank:03d}.lock"
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                     "staging": str(staging)}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            value = json.loads(self.storage.read_bytes(self.name, 1 << 16))
            return value if isinstance(value, dict) else None
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a damaged lock object holds nothing

    def _write(self) -> None:
        self.storage.write_bytes(self.name, json.dumps({**self.mine, "time": time.time()}).encode())

    def acquire(self) -> None:
        from teachercache.teacher.build import BuildError

        held = self._read()
        if held is not None and self._alive(held):
            age = _age(held)
            raise BuildError(f"{self.storage.location()}: another build is writing into this cache (rank "
                             f"{self.rank} is locked by {held.get('host')} process {held.get('pid')}, its lock "
                             f"{self.storage.location(self.name)} refreshed {age:.0f} s ago; a lock is stale "
                             f"after {LOCK_STALE_SECONDS:.0f} s without a refresh); wait for it or choose "
                             "another --out")
        self._write()
        if (self._read() or {}).get("token") != self.mine["token"]:
            raise BuildError(f"{self.storage.location()}: another build took the lock "
                             f"{self.storage.location(self.name)} at the same moment; wait for it or choose another "
                             "--out")
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="teachercache-lock")
        self._thread.start()

    def _alive(self, held: dict) -> bool:
        """Whether the lock ``held`` may belong to a running build: on this machine, one whose process lives and
        whose staging directory is another (this build holds the lock of its own, so a build that used it is
        gone); on another machine, one refreshed less than LOCK_STALE_SECONDS ago."""
        if held.get("host") == self.mine["host"]:
            if held.get("staging") == self.mine["staging"]:
                return False
            try:
                pid = int(held.get("pid", 0))
                if pid <= 0:
                    return False
                os.kill(pid, 0)
            except (ProcessLookupError, ValueError, TypeError, OverflowError):
                return False
            except PermissionError:  # a process of another user
                return True
            return True
        return _age(held) < LOCK_STALE_SECONDS

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_SECONDS):
            try:
                held = self._read()
                if (held or {}).get("token") != self.mine["token"]:
                    self.lost = f"taken over by {(held or {}).get('host')} process {(held or {}).get('pid')}"
                    return
                self._write()
            except Exception:  # the store unreachable for a while: tried again at the next refresh
                continue

    def check(self, fresh: bool = False) -> None:
        """BuildError when the lock is no longer this build's (``fresh``: read it now)."""
        from teachercache.teacher.build import BuildError

        if fresh and self.lost is None:
            held = self._read()
            if (held or {}).get("token") != self.mine["token"]:
                self.lost = f"taken over by {(held or {}).get('host')} process {(held or {}).get('pid')}"
        if self.lost is not None:
            raise BuildError(f"{self.storage.location()}: this build's lock {self.storage.location(self.name)} was "
                             f"{self.lost}; this build stops without writing more (the other build goes on)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.mine["token"]:
                self.storage.remove(self.name)
        except TeachercacheError:
            pass  # left behind: stale once LOCK_STALE_SECONDS pass without a refresh
