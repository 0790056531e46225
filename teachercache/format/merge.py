"""`teachercache merge`: one cache over the caches that `build --slice i/n` jobs wrote.

    merge_caches(["c-0", "c-1", "c-2"], "cache")                          # references the parts' shards
    merge_caches(["c-0", "c-1", "c-2"], "cache", MergeOptions(copy=True))  # copies them into cache/shards/

Each refusal names the part and the field. Every part must be a complete cache (its manifest reads) built
with --slice (its manifest's extra.slice, under format.slices' partition rule); the slices must be 0..n-1
of one n, each exactly once; and the parts must agree on everything that decides the rows and their values:
format and layout, teacher (name, config fingerprint, dtype, output width), tokenizer fingerprint, target spec,
and data (sources, fingerprint, seq-len, packing, documents read, used and skipped: each slice reads the
whole corpus, so these are the one-job build's).

The merged manifest lists slice 0's shards, then slice 1's, and so on, each slice's in its own manifest's
order. Its rows are the one-job build's, value for value, in another file order: row g of the one-job build
is row g div n of slice g mod n (docs/scale.md).

Without --copy the manifest references the parts' shards where they lie, by a relative path from the merged
directory (``../c-0/shards/part-r000-00000.arrow``; format.manifest.is_reference): moving the merged cache
and its parts together keeps it readable, and a reader confines each reference to the part's own directory,
which must still be a complete cache on the same filesystem. Merge refuses a part on another filesystem than
--out (a reader elsewhere may mount the two apart): --copy copies every shard into CACHE/shards/ as
``slice-IIIII-NAME`` (checking each one's SHA-256 as it is copied), and the merged cache stands alone.

Parts and --out at URLs (s3://...; ``_merge_through_storage``): without --copy they must share one bucket, and
the manifest references the parts' objects by the same relative paths (a reader at the URL checks that each
referenced part has a manifest and stays in the bucket); with --copy each shard is streamed down with its
SHA-256 checked and uploaded whole. The manifest is written last, as one object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from teachercache.errors import CacheCorruptError, TeachercacheError
from teachercache.format.cache import check_tokenizer_files
from teachercache.format.manifest import (MANIFEST_NAME, SHARDS_DIR, TOKENIZER_DIR, Manifest, Totals, confine_paths,
                                          is_reference, read_manifest, write_manifest)
from teachercache.format.outputs import LOCK, MARKER, hold_lock, identify, marker_json, write_marker
from teachercache.format.shards import ShardInfo, commit_file
from teachercache.format.slices import EXTRA_KEY, RULE, Slice
from teachercache.format.storage import is_url, open_storage

MERGE_KEY = "merge"
"""The key of the merged manifest's ``extra`` that records the parts."""
SKIPPED_NAME = "skipped.jsonl"
"""A build's list of skipped records (teacher.build), copied from slice 0: every slice reads every record."""
_COPY_CHUNK = 8 << 20


class MergeError(TeachercacheError):
    """Parts that cannot be merged into one cache, or an --out that merge cannot write."""


@dataclass(frozen=True)
class MergeOptions:
    """How `teachercache merge` writes the merged cache."""

    copy: bool = False
    """Copy every part's shards into the merged cache's shards/ (it then stands alone). Without it the manifest
    references them where they lie, by relative paths on the same filesystem: keep the parts in place."""


_FIXES = {
    "format": "build every slice with the same teachercache release",
    "layout": "build every slice with the same teachercache release and --hidden-layers/--hidden-dtype",
    "teacher": "build every slice with the same --teacher and --dtype",
    "tokenizer": "build every slice with the same --teacher (its tokenizer)",
    "targets": "build every slice with the same target options (--target, --k, --top-p, --samples, --seed, ...)",
    "data": "build every slice over the same, unchanged --data files (same paths, sizes, modification times) with "
            "the same --seq-len, --packing, --text-field and --max-docs",
}


def merge_caches(parts: Sequence[str | os.PathLike], out: str | os.PathLike,
                 options: MergeOptions = MergeOptions()) -> Manifest:
    """Write one cache at ``out`` over the slice caches ``parts`` (see the module docstring); returns its
    manifest, read back as a reader will read it. MergeError (or a CacheError naming a part's file) when
    the parts do not make one build, or ``out`` cannot take the merge."""
    if not parts:
        raise MergeError("merge: give the caches of every slice (teachercache merge PART... --out CACHE)")
    if any(is_url(p) for p in [*parts, out]):
        return _merge_through_storage([str(p) for p in parts], str(out), options)
    paths = [Path(p) for p in parts]
    out = Path(out)
    _check_places(paths, out)
    manifests = [read_manifest(p) for p in paths]
    order = _slice_order(paths, manifests)
    first = order[0]
    for i in order[1:]:
        _check_same(paths[i], manifests[i], paths[first], manifests[first])
    for path, m in zip(paths, manifests):
        _check_shard_files(path, m)
    if not options.copy:
        _check_filesystem(paths, out)
    _claim(out)
    lock = hold_lock(out, "merge")
    try:
        write_marker(out, "cache", {f"{MERGE_KEY}.parts": [os.path.realpath(p) for p in paths],
                                    f"{MERGE_KEY}.copy": options.copy})
        _copy_tokenizer(paths[first], out)
        shards, records = [], []
        for index, i in enumerate(order):  # slice index, and the part that holds it
            part, m = paths[i], manifests[i]
            placed = _copy_shards(part, m, out, index) if options.copy else _reference(part, m, out)
            shards += placed
            records.append({"slice": index, "path": os.path.relpath(os.path.realpath(part), os.path.realpath(out)),
                            "rows": m.totals.rows, "shards": len(placed)})
        extra = {MERGE_KEY: {"count": len(paths), "rule": RULE, "copy": options.copy, "parts": records}}
        if (paths[first] / SKIPPED_NAME).is_file():
            shutil.copyfile(paths[first] / SKIPPED_NAME, out / SKIPPED_NAME)
            extra["skipped_report"] = SKIPPED_NAME
        m0 = manifests[first]
        manifest = Manifest(layout=m0.layout, targets=m0.targets, teacher=m0.teacher, tokenizer=m0.tokenizer,
                            data=m0.data, shards=shards, totals=Totals.of(shards), extra=extra)
        where = str(out / MANIFEST_NAME)
        confine_paths(out, [s.file for s in shards], where)  # as a reader will resolve them, before it is written
        write_manifest(out, manifest)
    finally:
        lock.close()
    return read_manifest(out)


# ---------------------------------------------------------------------------------------------------
# The checks.


def _check_places(paths: list[Path], out: Path) -> None:
    """Each part given once; --out neither a part, nor inside one, nor holding one."""
    real_out = Path(os.path.realpath(out))
    seen: dict[Path, Path] = {}
    for p in paths:
        real = Path(os.path.realpath(p))
        if real in seen:
            raise MergeError(f"{p}: given twice (as {seen[real]} and {p}); give each slice's cache once")
        seen[real] = p
        if real == real_out or real in real_out.parents or real_out in real.parents:
            raise MergeError(f"--out {out}: is, holds or lies inside the part {p}; write the merged cache to a "
                             "directory of its own, beside the parts")


def _slice_order(paths: list, manifests: list[Manifest]) -> list[int]:
    """Indices of ``paths`` in slice order, after checking that they are the slices 0..n-1 of one n, once each."""
    slices = []
    for p, m in zip(paths, manifests):
        if EXTRA_KEY not in m.extra:
            raise MergeError(f"{p}: not a slice (its manifest records no extra.{EXTRA_KEY}); merge joins the caches "
                             "of `teachercache build --slice i/n`: build each part with --slice")
        slices.append(Slice.from_record(m.extra[EXTRA_KEY], f"{p}/{MANIFEST_NAME}"))
    n = slices[0].count
    for p, s in zip(paths, slices):
        if s.count != n:
            raise MergeError(f"{p}: slice {s}, but {paths[0]} is slice {slices[0]}: the parts come from different "
                             "--slice counts n; merge the n slices of one build")
    at: dict[int, int] = {}
    for k, s in enumerate(slices):
        if s.index in at:
            raise MergeError(f"slice {s} is given twice: {paths[at[s.index]]} and {paths[k]}; give each slice once")
        at[s.index] = k
    missing = [i for i in range(n) if i not in at]
    if missing:
        shown = ", ".join(f"{i}/{n}" for i in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10
                                                               else "")
        raise MergeError(f"slice {shown} missing: {len(paths)} of the {n} slices were given; give the cache of "
                         "every slice 0..n-1")
    return [at[i] for i in range(n)]


def _fields(m: Manifest) -> dict:
    """What must agree between the parts, by field name (``targets.k``, ``data.seq_len``, ...), in the order they
    are compared: the data's fingerprint last, so that a difference the user can name (seq_len, packing,
    documents read) is the one reported."""
    data = dataclasses.asdict(m.data)
    data["fingerprint"] = data.pop("fingerprint")
    out = {"format": m.format, "format_version": m.format_version}
    for group, values in (("layout", m.layout.to_dict()), ("teacher", dataclasses.asdict(m.teacher)),
                          ("tokenizer", dataclasses.asdict(m.tokenizer)), ("targets", dataclasses.asdict(m.targets)),
                          ("data", data)):
        out.update({f"{group}.{name}": value for name, value in values.items()})
    return out


def _check_same(path, m: Manifest, first, m0: Manifest) -> None:
    mine, theirs = _fields(m), _fields(m0)
    for name in theirs:
        if mine.get(name) != theirs[name]:
            group = name.split(".")[0].removesuffix("_version")
            raise MergeError(f"{path}: {name} is {_short(mine.get(name))}, but {first} (slice 0) has "
                             f"{_short(theirs[name])}: the parts come from different builds; {_FIXES[group]}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_shard_files(path, m: Manifest) -> None:
    """A part's shards lie directly in its shards/ (a merged cache, whose shards lie elsewhere, is no part)."""
    for s in m.shards:
        directory, _, name = s.file.rpartition("/")
        if directory != SHARDS_DIR or not name.endswith(".arrow") or is_reference(s.file):
            raise MergeError(f"{path}: shard {s.file!r} does not lie directly in its {SHARDS_DIR}/; merge joins the "
                             "caches that `build --slice` writes")


def _device(path: Path) -> int:
    """st_dev of ``path``, or of its nearest existing parent."""
    for p in (path, *Path(os.path.abspath(path)).parents):
        if p.exists():
            return os.stat(p).st_dev
    return os.stat("/").st_dev


def _check_filesystem(paths: list[Path], out: Path) -> None:
    """References stay within one filesystem: every part (and its shards/) on --out's."""
    device = _device(out)
    for p in paths:
        for d in (p, p / SHARDS_DIR):
            if d.exists() and os.stat(d).st_dev != device:
                raise MergeError(f"{p}: lies on another filesystem than --out {out}; a reference to its shards would "
                                 "break wherever the two are mounted apart: merge with --copy, or write --out on "
                                 "the parts' filesystem")


# ---------------------------------------------------------------------------------------------------
# Writing.


def _claim(out: Path) -> None:
    """Make ``out`` ready: missing or empty, or the leftovers of a merge that stopped before its manifest
    (cleared: only its own entries). Anything else is refused."""
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out}: exists and is not a directory; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if all(p.name == LOCK for p in out.iterdir()):
        return
    _, marker = identify(out)
    interrupted = (marker is not None and f"{MERGE_KEY}.parts" in marker.get("options", {})
                   and not (out / MANIFEST_NAME).exists())
    if not interrupted:
        raise MergeError(f"--out {out}: not empty; merge writes a new cache: choose a new --out (or delete it)")
    for name in (SHARDS_DIR, TOKENIZER_DIR, f"{TOKENIZER_DIR}.partial", SKIPPED_NAME, MARKER):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _copy_tokenizer(part: Path, out: Path) -> None:
    """The tokenizer/ of ``part`` (checked as a reader checks it) into ``out``, published by a rename."""
    source = check_tokenizer_files(part)
    tmp = out / f"{TOKENIZER_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in sorted(source.iterdir()):
        shutil.copyfile(f, tmp / f.name)
    os.replace(tmp, out / TOKENIZER_DIR)


def _reference(part: Path, m: Manifest, out: Path) -> list[ShardInfo]:
    """The part's shards as references from ``out``; each one must be there with its recorded size (its
    checksum is checked by every reader, and by `teachercache verify`)."""
    base = os.path.relpath(os.path.realpath(part), os.path.realpath(out)).replace(os.sep, "/")
    shards = []
    for s in m.shards:
        _check_size(part, s)
        shards.append(_as_reference(part, base, s))
    return shards


def _as_reference(part, base: str, s: ShardInfo) -> ShardInfo:
    """Shard ``s`` of ``part`` named by its path from --out (``base``: the part's directory from there)."""
    file = f"{base}/{s.file}"
    if not is_reference(file):
        raise MergeError(f"{part}: its shard's path from --out, {file!r}, cannot be written as a reference "
                         "(a relative path of plain names, at most 1024 characters): merge with --copy, or "
                         "put --out beside the parts")
    return dataclasses.replace(s, file=file)


def _check_size(part: Path, s: ShardInfo) -> None:
    path = part / s.file
    if not path.is_file():
        raise CacheCorruptError(path, "missing or not a regular file, though the part's manifest lists it",
                                "rebuild that slice or restore the file")
    if path.stat().st_size != s.bytes:
        raise CacheCorruptError(path, f"size {path.stat().st_size} bytes, the part's manifest says {s.bytes}",
                                "rebuild that slice or restore the file")


def _copy_shards(part: Path, m: Manifest, out: Path, index: int) -> list[ShardInfo]:
    """The part's shards copied into out/shards/ as slice-IIIII-NAME, each one's SHA-256 checked on the way."""
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    shards = []
    for s in m.shards:
        _check_size(part, s)
        file = f"{SHARDS_DIR}/slice-{index:05d}-{s.file.rpartition('/')[2]}"
        final = out / file
        tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
        h = hashlib.sha256()
        with open(part / s.file, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(_COPY_CHUNK):
                h.update(chunk)
                dst.write(chunk)
        if h.hexdigest() != s.sha256:
            tmp.unlink()
            raise CacheCorruptError(part / s.file, "SHA-256 differs from the part's manifest: the file is damaged",
                                    "rebuild that slice or restore the file")
        commit_file(tmp, final)
        shards.append(dataclasses.replace(s, file=file))
    return shards


# ---------------------------------------------------------------------------------------------------
# Parts or --out at URLs.


def _merge_through_storage(parts: list[str], out: str, options: MergeOptions) -> Manifest:
    """merge_caches where a part or --out is a URL: the same checks, then every shard referenced (all in one
    bucket) or copied into OUT/shards/ (--copy: streamed down with its SHA-256 checked, then uploaded whole),
    the tokenizer and the skipped list of slice 0, and the manifest last, as one object. An --out that a merge
    left without its manifest is cleared and written again; one two merges write at once is not protected
    (give each merge its own --out)."""
    from teachercache.format.cache import Cache  # format.cache imports this package's modules

    target = open_storage(out)
    if not options.copy:
        bucket = _bucket(target)
        for p in parts:
            if _bucket(open_storage(p)) != bucket:
                raise MergeError(f"{p}: not in the bucket of --out {out}; a reference stays within one bucket (or "
                                 "filesystem): merge with --copy, or write --out beside the parts")
    if len({p.rstrip("/") for p in parts}) != len(parts) or out.rstrip("/") in {p.rstrip("/") for p in parts}:
        raise MergeError(f"--out {out}: give each part once, and write the merged cache to a place of its own")
    manifests = [Cache.open(p, verify_checksums=False).manifest for p in parts]
    order = _slice_order(parts, manifests)
    first = order[0]
    for i in order[1:]:
        _check_same(parts[i], manifests[i], parts[first], manifests[first])
    for part, m in zip(parts, manifests):
        _check_shard_files(part, m)
    _claim_storage(target)
    target.write_bytes(MARKER, json.dumps(marker_json("cache", {f"{MERGE_KEY}.parts": parts,
                                                                f"{MERGE_KEY}.copy": options.copy}), indent=1).encode())
    source0 = open_storage(parts[first])
    for name, size in sorted(source0.list(TOKENIZER_DIR).items()):
        target.write_bytes(f"{TOKENIZER_DIR}/{name}", source0.read_bytes(f"{TOKENIZER_DIR}/{name}", size or 0))
    shards, records = [], []
    with tempfile.TemporaryDirectory(prefix="teachercache-merge-") as scratch:
        for index, i in enumerate(order):
            source, m = open_storage(parts[i]), manifests[i]
            if not options.copy:
                shards += _reference_objects(parts[i], source, m, target)
                records.append({"slice": index, "path": parts[i], "rows": m.totals.rows, "shards": len(m.shards)})
                continue
            for s in m.shards:
                file = f"{SHARDS_DIR}/slice-{index:05d}-{s.file.rpartition('/')[2]}"
                local = Path(scratch) / "shard.arrow"
                source.download(s.file, local, size=s.bytes, sha256=s.sha256)  # CacheCorruptError names it
                target.put_file(local, file)
                local.unlink()
                shards.append(dataclasses.replace(s, file=file))
            records.append({"slice": index, "path": parts[i], "rows": m.totals.rows, "shards": len(m.shards)})
        extra = {MERGE_KEY: {"count": len(parts), "rule": RULE, "copy": options.copy, "parts": records}}
        if source0.exists(SKIPPED_NAME):
            source0.download(SKIPPED_NAME, Path(scratch) / SKIPPED_NAME)
            target.put_file(Path(scratch) / SKIPPED_NAME, SKIPPED_NAME)
            extra["skipped_report"] = SKIPPED_NAME
        m0 = manifests[first]
        manifest = Manifest(layout=m0.layout, targets=m0.targets, teacher=m0.teacher, tokenizer=m0.tokenizer,
                            data=m0.data, shards=shards, totals=Totals.of(shards), extra=extra)
        target.put_file(write_manifest(scratch, manifest), MANIFEST_NAME)  # last: one object, whole or not at all
    return Cache.open(out, verify_checksums=False).manifest


def _bucket(storage) -> str | None:
    """The bucket (an object store's; for other protocols the top directory) of a storage at a URL; None for a
    local one."""
    return f"{storage.url.split('://', 1)[0]}://{storage.root.split('/', 1)[0]}" if storage.remote else None


def _reference_objects(part: str, source, m: Manifest, target) -> list[ShardInfo]:
    """The part's shards as references from ``target`` (``../PART/shards/NAME``, within the bucket), each one
    checked to be there with its recorded size."""
    base = posixpath.relpath(source.root, target.root)
    listed = source.list(SHARDS_DIR)
    shards = []
    for s in m.shards:
        name = s.file.rpartition("/")[2]
        if listed.get(name) != s.bytes:
            raise CacheCorruptError(source.location(s.file), f"size {listed.get(name)} bytes, the part's manifest "
                                    f"says {s.bytes}", "rebuild that slice or restore the object")
        shards.append(_as_reference(part, base, s))
    return shards


def _claim_storage(target) -> None:
    """--out at a URL (or a local --out of a merge from URLs): empty, or what a stopped merge left there (its
    marker, shards/, tokenizer/, skipped list, no manifest), which is cleared."""
    listing = target.list("")
    if not listing:
        return
    leftovers = MANIFEST_NAME not in listing and set(listing) <= {MARKER, SHARDS_DIR, TOKENIZER_DIR, SKIPPED_NAME,
                                                                  LOCK}
    if leftovers and MARKER in listing:
        marker = json.loads(target.read_bytes(MARKER, 1 << 20))
        leftovers = f"{MERGE_KEY}.parts" in marker.get("options", {})
    if not leftovers or MARKER not in listing:
        raise MergeError(f"--out {target.location()}: not empty; merge writes a new cache: choose a new --out "
                         "(or delete it)")
    for name in (SHARDS_DIR, TOKENIZER_DIR, SKIPPED_NAME, MARKER):
        target.remove(name)
