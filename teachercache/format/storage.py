"""Where a cache lives: a local directory, or an fsspec URL (s3://, gs://, hf://, any installed protocol).

A Storage is rooted at a cache's location and takes paths relative to it, POSIX-style
(``shards/part-r000-00000.arrow``). It does what the cache's writers and readers need of a place, and no more:
list, exists, read (whole, or a byte range), stream a file down with its SHA-256 checked on the way, put a file,
write an object as atomically as the place allows, remove.

What is atomic where:

* ``LocalStorage`` keeps what every local cache file has always had: written under a temporary name, fsynced,
  renamed over the final name, the directory fsynced (``shards.commit_file``). A reader never sees half a file.
* ``FsspecStorage``: object stores have no rename, but an object is written by one PUT (or one multipart upload,
  which the store makes visible only when it completes): it appears whole, or not at all. ``write_bytes`` is
  one PUT; ``put_file`` uploads a finished local file in one piece. Filesystems that fsspec reaches without
  object semantics (sftp, smb, ...) may show a file while it is being written: a cache's readers never trust a
  shard the manifest does not list, nor one whose SHA-256 differs, and the manifest is written last.

Credentials and endpoints are those of the protocol's own package; teachercache adds no flags for them:

* s3:// (``pip install 'teachercache[s3]'``, s3fs): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN),
  AWS_PROFILE and ~/.aws/, or the machine's role. Another endpoint (MinIO, Ceph, R2, a test server):
  ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), read by botocore, or ``FSSPEC_S3_ENDPOINT_URL``.
* gs:// (``pip install 'teachercache[gcs]'``, gcsfs): GOOGLE_APPLICATION_CREDENTIALS or gcloud's login.
* hf:// (huggingface_hub): HF_TOKEN or ``huggingface-cli login``.
* any protocol: fsspec's configuration, ``FSSPEC_<PROTOCOL>_<ARGUMENT>`` variables or ~/.config/fsspec/*.json,
  gives its filesystem's arguments; from Python, ``storage_options={...}`` where a function takes it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import threading
from pathlib import Path
from typing import Protocol

from teachercache.errors import CacheCorruptError, CachePathError, StorageError

CHUNK_BYTES = 8 << 20
"""Bytes per read when a file is streamed down: each is one ranged GET on an object store."""
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
"""Protocol -> the optional dependency group of teachercache that installs its package."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is an fsspec URL (``PROTOCOL://...``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


class Storage(Protocol):
    """A cache's location; every path is relative to it (POSIX separators, '' for the location itself)."""

    remote: bool

    def location(self, relative: str = "") -> str:
        """What a message calls ``relative``: its URL, or its local path."""

    def list(self, relative: str = "") -> dict[str, int | None]:
        """The entries directly under ``relative``: name -> size in bytes (None for a directory or prefix);
        empty when there is nothing there."""

    def exists(self, relative: str) -> bool: ...

    def read_bytes(self, relative: str, max_bytes: int) -> bytes:
        """The whole file; CacheCorruptError naming it when it holds more than ``max_bytes``."""

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file (fewer at its end)."""

    def download(self, relative: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> None:
        """Stream the file into the local file ``dest`` (written under a temporary name, renamed when complete),
        hashing it on the way: CacheCorruptError naming the file when its size or SHA-256 differs from the
        given ones (``dest`` is then left untouched)."""

    def put_file(self, local: Path, relative: str) -> None:
        """Make the finished local file ``local`` the file ``relative``, whole (see the module docstring)."""

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write ``data`` as the file ``relative``, as atomically as the place allows."""

    def remove(self, relative: str) -> None:
        """Delete a file or a whole directory (prefix); nothing if it is not there."""


def open_storage(location: str | os.PathLike, storage_options: dict | None = None) -> Storage:
    """The Storage of a cache location: FsspecStorage for a URL, LocalStorage for a path."""
    if is_url(location):
        return FsspecStorage(str(location), storage_options)
    return LocalStorage(location)


class LocalStorage:
    """A local directory: files written to a temporary name, fsynced and renamed (as every cache file is)."""

    remote = False

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def location(self, relative: str = "") -> str:
        return str(self.root / relative) if relative else str(self.root)

    def list(self, relative: str = "") -> dict[str, int | None]:
        try:
            with os.scandir(self.root / relative) as entries:
                return {e.name: None if e.is_dir() else e.stat().st_size for e in entries}
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def exists(self, relative: str) -> bool:
        return (self.root / relative).exists()

    def read_bytes(self, relative: str, max_bytes: int) -> bytes:
        with open(self.root / relative, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise CacheCorruptError(self.location(relative), f"holds more than the limit of {max_bytes} bytes")
        return data

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        with open(self.root / relative, "rb") as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def download(self, relative: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> None:
        with open(self.root / relative, "rb") as source:
            _stream_to(source, dest, self.location(relative), size, sha256)

    def put_file(self, local: Path, relative: str) -> None:
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() != target.resolve():
            from teachercache.format.shards import commit_file  # (this module stays light: prefetch workers import it)

            tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
            shutil.copyfile(local, tmp)
            commit_file(tmp, target)

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
        tmp.write_bytes(data)
        from teachercache.format.shards import commit_file

        commit_file(tmp, target)

    def remove(self, relative: str) -> None:
        path = self.root / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class FsspecStorage:
    """A location reached through fsspec (an object store, a hub, a remote filesystem). Errors of the
    protocol's package (no such bucket, no credentials, no connection) become StorageError naming the URL."""

    remote = True

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0].lower()
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as e:
            extra = _EXTRAS.get(protocol)
            how = f"pip install 'teachercache[{extra}]'" if extra else f"install the fsspec package for {protocol}://"
            raise StorageError(f"{self.url}: reading or writing {protocol}:// needs a package that is not installed "
                               f"({e}); {how}") from None
        except ValueError as e:
            raise StorageError(f"{self.url}: fsspec does not know the protocol {protocol}:// ({e}); give a local "
                               "path or a URL of an installed protocol (s3://, gs://, hf://, ...)") from None
        self.root = self.root.rstrip("/")

    def __getstate__(self):  # filesystems pickle themselves by their arguments (DataLoader workers, spawn)
        return {"url": self.url, "fs": self.fs, "root": self.root}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _path(self, relative: str) -> str:
        if not relative:
            return self.root
        if not relative.startswith("../"):
            return f"{self.root}/{relative}"
        # a merged cache's reference to another cache's object (format.manifest.is_reference): it must stay in
        # the bucket (the first component of the filesystem's path)
        joined = posixpath.normpath(f"{self.root}/{relative}")
        if joined.startswith("..") or joined.split("/", 1)[0] != self.root.split("/", 1)[0]:
            raise CachePathError(self.location(relative), "leaves the bucket (or top directory) of the cache",
                                 "a reference names another cache in the same bucket")
        return joined

    def location(self, relative: str = "") -> str:
        return f"{self.url}/{relative}" if relative else self.url

    def _failed(self, relative: str, doing: str, e: BaseException) -> StorageError:
        text = " ".join(str(e).split())[:300] or type(e).__name__
        hint = ("check the URL, the credentials and the endpoint (docs/storage.md: AWS_* variables, "
                "AWS_ENDPOINT_URL_S3, FSSPEC_<PROTOCOL>_<ARGUMENT>)")
        return StorageError(f"{self.location(relative)}: cannot {doing} ({type(e).__name__}: {text}); {hint}")

    def list(self, relative: str = "") -> dict[str, int | None]:
        path = self._path(relative)
        try:
            self.fs.invalidate_cache(path)
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # botocore, aiohttp, gcsfs raise their own types
            raise self._failed(relative, "list it", e) from None
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e["name"].rstrip("/") == path.rstrip("/"):
                continue  # a file listed as itself
            out[name] = None if e.get("type") == "directory" else int(e.get("size") or 0)
        return out

    def exists(self, relative: str) -> bool:
        path = self._path(relative)
        try:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))
        except Exception as e:
            raise self._failed(relative, "look it up", e) from None

    def read_bytes(self, relative: str, max_bytes: int) -> bytes:
        try:
            with self.fs.open(self._path(relative), "rb", cache_type="none") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._failed(relative, "read it", e) from None
        if len(data) > max_bytes:
            raise CacheCorruptError(self.location(relative), f"holds more than the limit of {max_bytes} bytes")
        return data

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        try:
            return self.fs.cat_file(self._path(relative), start=start, end=end)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._failed(relative, f"read bytes {start} to {end}", e) from None

    def download(self, relative: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> None:
        path, known = self._path(relative), {"size": size} if size is not None else {}
        try:  # with the size known, no HEAD request first (s3fs, gcsfs and most others take it)
            try:
                source = self.fs.open(path, "rb", block_size=CHUNK_BYTES, cache_type="none", **known)
            except TypeError:
                source = self.fs.open(path, "rb", block_size=CHUNK_BYTES, cache_type="none")
        except FileNotFoundError:
            raise CacheCorruptError(self.location(relative), "the object is missing",
                                    "the manifest lists it; rebuild the cache or restore the object") from None
        except Exception as e:
            raise self._failed(relative, "open it", e) from None
        try:
            with source:
                _stream_to(source, dest, self.location(relative), size, sha256)
        except (CacheCorruptError, LocalWriteError):  # the local disk (full, not writable): the caller names it
            raise
        except Exception as e:
            actual = self.list(relative.rpartition("/")[0]).get(relative.rpartition("/")[2])
            if size is not None and actual is not None and actual != size:  # read past a shorter object's end
                raise CacheCorruptError(self.location(relative), f"size {actual} bytes, the manifest says {size} "
                                        "(truncated or replaced?)", "rebuild the cache or restore the file") from None
            raise self._failed(relative, "download it", e) from None

    def put_file(self, local: Path, relative: str) -> None:
        try:
            self.fs.put_file(str(local), self._path(relative))
        except Exception as e:
            raise self._failed(relative, f"upload {local} to it", e) from None

    def write_bytes(self, relative: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._path(relative), data)
        except Exception as e:
            raise self._failed(relative, "write it", e) from None

    def remove(self, relative: str) -> None:
        path = self._path(relative)
        try:
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._failed(relative, "delete it", e) from None


def download_file(storage: Storage, relative: str, dest: str, size: int | None, sha256: str | None) -> None:
    """``storage.download`` as a function of picklable arguments: what a prefetch worker process runs
    (format.mirror)."""
    storage.download(relative, Path(dest), size=size, sha256=sha256)


class LocalWriteError(OSError):
    """Writing the local copy of a downloaded file failed (a full or read-only disk), as opposed to reading it."""


def _stream_to(source, dest: Path, where: str, size: int | None, sha256: str | None) -> None:
    """Copy the open binary file ``source`` into ``dest`` through SHA-256, CHUNK_BYTES at a time; the copy is
    renamed to ``dest`` only once its size and digest are those expected (CacheCorruptError naming ``where``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}-{threading.get_ident()}")
    digest, count = hashlib.sha256(), 0
    try:
        try:
            f = open(tmp, "wb")
        except OSError as e:
            raise LocalWriteError(e.errno, e.strerror, str(tmp)) from None
        with f:
            while chunk := source.read(CHUNK_BYTES):
                digest.update(chunk)
                try:
                    f.write(chunk)
                except OSError as e:
                    raise LocalWriteError(e.errno, e.strerror, str(tmp)) from None
                count += len(chunk)
                if size is not None and count > size:
                    break
        if size is not None and count != size:
            raise CacheCorruptError(where, f"size {'more than ' if count > size else ''}{count} bytes, the manifest "
                                    f"says {size} (truncated or replaced?)", "rebuild the cache or restore the file")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CacheCorruptError(where, "SHA-256 differs from the manifest (checked while downloading): the file is "
                                    "damaged", "rebuild the cache or restore the file")
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise LocalWriteError(e.errno, e.strerror, str(dest)) from None
    finally:
        tmp.unlink(missing_ok=True)
