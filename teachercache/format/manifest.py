"""manifest.json: the record of a complete cache, and the fingerprints that tie it to its teacher.

The manifest is written last, atomically (temporary name, fsync, rename): its presence means the cache is
complete. It holds the format version, the layout needed to decode the shards, what the targets are, which
teacher and tokenizer produced them, what data went in, and every shard with its size and SHA-256.

Parsing is strict: a missing field (defaults are never filled in on reading), an unknown field or a
value of the wrong type is a CacheFormatError naming the field, so a hand-edited manifest cannot silently
mean something else. It is bounded too: the file's size and nesting, and every declared size (against the
MAX_* limits, each other and the tokenizer files), are checked before anything is sized from them, and the
time to read it is linear in its shard entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import math
import operator
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path

from teachercache.errors import (CacheFormatError, CacheIncompleteError, CacheLimitError, CachePathError,
                                 CacheVersionError)
from teachercache.format import schema as S
from teachercache.format.shards import ShardInfo, commit_file

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
TOKENIZER_DIR = "tokenizer"
STATE_DIR = "state"


def shard_file_name(rank: int, index: int) -> str:
    """Relative path of shard ``index`` written by rank ``rank``."""
    return f"{SHARDS_DIR}/part-r{rank:03d}-{index:05d}.arrow"


@dataclass(frozen=True)
class TargetSpec:
    """What was stored per target position (see DESIGN.md §3)."""

    kind: str = "topk"
    """topk | nucleus | sample."""
    k: int | None = 64
    """topk: ids per position."""
    top_p: float | None = None
    """nucleus: mass to reach."""
    min_k: int | None = None
    """nucleus: fewest ids per position."""
    max_k: int | None = None
    """nucleus: most ids per position."""
    samples: int | None = None
    """sample: draws per position (with replacement)."""
    seed: int | None = None
    """sample: base seed of the draws."""
    temperature: float = 1.0
    """Teacher softmax temperature the log-probs were computed at."""

    def __post_init__(self):
        if self.kind not in S.TARGET_KINDS:
            raise ValueError(f"target kind {self.kind!r} is not one of {S.TARGET_KINDS}")


@dataclass(frozen=True)
class TeacherInfo:
    name_or_path: str
    """Hub id or local path the teacher was loaded from."""
    config_sha256: str
    """config_fingerprint() of the teacher's config."""
    dtype: str
    """dtype the teacher ran in (bfloat16, float16, float32)."""
    output_size: int
    """Width of the teacher's logits (may exceed the tokenizer's vocabulary: padding)."""


@dataclass(frozen=True)
class TokenizerInfo:
    fingerprint: str
    """tokenizer_fingerprint() of the teacher's tokenizer."""
    vocab_size: int
    """len(tokenizer): ids a target may hold."""


@dataclass(frozen=True)
class DataInfo:
    sources: list[str]
    """Input files or dataset paths, as given."""
    fingerprint: str
    """Hash of the input data (see teachercache.teacher.corpus)."""
    seq_len: int
    """Tokens per row (the longest row, for one-document-per-row packing)."""
    packing: str
    """concat (documents joined with EOS, cut into seq_len rows) | document (one document per row)."""
    documents_read: int = 0
    documents_used: int = 0
    documents_skipped: dict[str, int] = field(default_factory=dict)
    """Skipped documents by reason (empty, undecodable, missing field, ...)."""


@dataclass(frozen=True)
class Totals:
    rows: int
    tokens: int
    target_positions: int
    target_entries: int
    bytes: int

    @classmethod
    def of(cls, shards: list[ShardInfo]) -> "Totals":
        return cls(*(sum(getattr(s, f) for s in shards)
                     for f in ("rows", "tokens", "target_positions", "target_entries", "bytes")))


@dataclass(frozen=True)
class Manifest:
    layout: S.Layout
    targets: TargetSpec
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    data: DataInfo
    shards: list[ShardInfo]
    totals: Totals
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict = field(default_factory=dict)
    """Free-form build details (options, versions, timings); not needed to read the cache."""
    format: str = S.FORMAT_NAME
    format_version: int | None = None
    """The format version of the shards: the layout's (``layout.format_version``); None when building one
    takes it from the layout."""

    def __post_init__(self):
        if self.format_version is None:
            object.__setattr__(self, "format_version", self.layout.format_version)
        elif self.format_version != self.layout.format_version:
            raise ValueError(f"format_version {self.format_version} differs from the layout's "
                             f"{self.layout.format_version}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layout"] = self.layout.to_dict()
        for name in ("targets", "teacher", "tokenizer", "data", "totals"):
            d[name] = dataclasses.asdict(d[name])
        d["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return d


# ---------------------------------------------------------------------------------------------------
# Limits on what a manifest may declare. Readers size arrays, models and loops from these fields, so a
# hand-edited (or hostile) manifest with absurd values is refused when it is read, naming the field.

MAX_MANIFEST_BYTES = 1 << 29
"""manifest.json's size: 512 MiB, 2 million shard entries as the writer spells them (269 bytes each); reading
one of a million entries takes 4 s and 1 GB of memory here."""
MAX_JSON_DEPTH = 64
"""Nesting of any JSON file of a cache that is parsed (a manifest nests 4 levels, a tokenizer.json about 8)."""
MAX_SHARDS = 2_000_000
"""Shard entries of one manifest (the writer starts a shard every 512 MiB: 1 PiB of shards)."""
MAX_COUNT = (1 << 63) - 1
"""Any count or size in a manifest (it must fit a signed 64-bit integer)."""
MAX_VOCAB_SIZE = 1 << 24
"""layout.vocab_size and tokenizer.vocab_size: ids are stored in at most 3 bytes (docs/FORMAT.md)."""
MAX_OUTPUT_SIZE = 1 << 25
"""teacher.output_size: the vocabulary plus the padding of the teacher's logits."""
MAX_TARGET_SIZE = (1 << 16) - 1
"""targets.k, min_k, max_k: stored ids per target position (target_sizes is uint16)."""
MAX_SAMPLES = 1 << 20
"""targets.samples: draws per position."""
MAX_HIDDEN_LAYERS = 1024
"""Entries of layout.hidden_layers; each layer index is below this too."""
MAX_HIDDEN_WIDTH = 1 << 17
"""layout.hidden_width (the widest models today have 16384)."""
MAX_QUANTIZER_PIECES = 64
"""Pieces of layout.quantizer (the default has 3)."""
MAX_SEQ_LEN = 1 << 24
"""data.seq_len: tokens per row."""
MAX_PATH_CHARS = 1024
"""Characters of a shard's file name in the manifest (the writer's are 29)."""

_LIMIT_FIX = "the manifest was edited or damaged: restore it or rebuild the cache"


def _limit(where: str, name: str, value, limit, unit: str = "") -> CacheLimitError:
    """The error of a field beyond its limit: names the file, the field, the value and the limit."""
    return CacheLimitError(where, f"field {name}: {_brief(value)} is beyond the limit of {limit}{unit}", _LIMIT_FIX)


# ---------------------------------------------------------------------------------------------------
# Reading and writing.


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary name, fsync it, rename it over ``path`` and fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    commit_file(tmp, path)


def write_manifest(cache_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(cache_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path


def read_manifest(cache_dir: str | os.PathLike, check_reference=None) -> Manifest:
    """Read and check CACHE/manifest.json; every problem is a CacheError naming the file and field.

    The file is parsed within the size and depth limits above (``read_json_file``); every declared size is
    checked against its limit, against the other fields and against the tokenizer files' sizes
    (``check_limits``) before anything is sized from it. Reading is linear in the number of shard entries
    (4 s per million on a 2-core machine): C loops check the shard list a column at a time, and each distinct
    shard directory is resolved once (``confine_paths``).

    ``check_reference(base, where)``, where given, judges each other cache that the manifest's references
    name (``is_reference``: ``base`` is the path up to /shards/) instead of the local filesystem: a cache
    read from a URL (format.mirror) checks that it is a complete cache in the same bucket."""
    path = Path(cache_dir) / MANIFEST_NAME
    where = str(path)
    if not Path(cache_dir).is_dir():
        raise CacheIncompleteError(cache_dir, "is not a directory", "give the cache directory")
    if not path.is_file():
        raise CacheIncompleteError(where, "missing: the cache is incomplete (its build did not finish)",
                                   "finish it with `teachercache build --resume`")
    with _gc_paused():
        raw = read_json_file(path, MAX_MANIFEST_BYTES, max_depth=None)  # typed fields; check_limits bounds extra
        manifest = _parse_manifest(raw, where)
        check_limits(manifest, cache_dir)
        files = [s.file for s in manifest.shards]
        if check_reference is None:
            confine_paths(cache_dir, files, where)
        else:
            confine_paths(cache_dir, [f for f in files if not is_reference(f)], where)
            for base in dict.fromkeys(f.rpartition(f"/{SHARDS_DIR}/")[0] for f in files if is_reference(f)):
                check_reference(base, where)
    return manifest


def _parse_manifest(raw, where: str) -> Manifest:
    """The Manifest of a parsed manifest.json, every field checked against its type (and its limit)."""
    if not isinstance(raw, dict) or raw.get("format") != S.FORMAT_NAME:
        raise CacheFormatError(where, f"field format: expected {S.FORMAT_NAME!r}")
    version = raw.get("format_version")
    if type(version) is not int or version not in S.READABLE_VERSIONS:
        raise CacheVersionError(where, f"field format_version: {_brief(version)}, this reader reads "
                                f"{S.readable_versions_text()}", S.version_hint(version))
    values = {"layout": _parse_layout(_expect(raw, "layout", dict, where), where, version)}
    hints = _hints(Manifest)
    for f in dataclasses.fields(Manifest):
        if f.name == "layout":
            continue
        if f.name not in raw:
            raise CacheFormatError(where, f"field {f.name} is missing")
        if f.name == "shards":
            values["shards"], sums = _parse_shards(raw["shards"], values["layout"].vocab_size, where)
        else:
            values[f.name] = _parse(raw[f.name], hints[f.name], f.name, where)
    unknown = set(raw) - {f.name for f in dataclasses.fields(Manifest)}
    if unknown:
        raise CacheFormatError(where, f"unknown fields {_names(unknown)}")
    if values["totals"] != sums:
        raise CacheFormatError(where, "field totals: does not equal the sum over the shards")
    try:
        return Manifest(**values)
    except (TypeError, ValueError) as e:
        raise CacheFormatError(where, _brief(e, 300)) from None


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while a manifest is parsed: the millions of objects made are never
    garbage, and each collection walks them all (a million shard entries: 3.9 s to read paused, 6.3 s not)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_json_file(path: str | os.PathLike, max_bytes: int, max_depth: int | None = MAX_JSON_DEPTH):
    """Parse the UTF-8 JSON file ``path`` of a cache: refused (CacheFormatError naming it) unless it is a
    regular file of at most ``max_bytes`` bytes whose arrays and objects nest at most ``max_depth`` levels
    (None: only the parser's own limit of about 1000 levels is enforced, for a caller that checks the types of
    what it keeps and the depth of what it keeps untyped)."""
    where = str(path)
    try:  # O_NONBLOCK: opening a named pipe put in a file's place must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CacheFormatError(where, f"cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CacheFormatError(where, "is not a regular file", "restore the file")
        data = f.read(max_bytes + 1) if st.st_size <= max_bytes else b""
    if st.st_size > max_bytes or len(data) > max_bytes:
        raise CacheLimitError(where, f"{max(st.st_size, len(data))} bytes is beyond the limit of {max_bytes} "
                              "bytes for this file", "the file was replaced or damaged: restore it")
    too_deep = CacheLimitError(where, f"JSON nested deeper than the limit of {max_depth or MAX_JSON_DEPTH} levels",
                               "the file was replaced or damaged: restore it")
    try:
        text, data = data.decode("utf-8"), None  # one copy of the file in memory while it is parsed
        value = json.loads(text)
    except RecursionError:  # the parser's own depth limit (about 1000 levels)
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise CacheFormatError(where, f"not valid JSON ({_brief(e, 200)})") from None
    if max_depth is not None and _deeper_than(value, max_depth):
        raise too_deep
    return value


def _deeper_than(value, limit: int) -> bool:
    """Whether the arrays and objects of a parsed JSON value nest more than ``limit`` levels (level by level,
    no recursion: one pass over the containers)."""
    level, current = 1, [value] if type(value) in (dict, list) else []
    while current:
        if level > limit:
            return True
        deeper = []
        for container in current:
            for v in container.values() if type(container) is dict else container:
                if type(v) is dict or type(v) is list:
                    deeper.append(v)
        current, level = deeper, level + 1
    return False


def _names(names, shown: int = 5) -> str:
    """Field names for a message: the first few of them (a hostile manifest may hold millions)."""
    names = sorted(str(n)[:60] for n in names)
    return repr(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _brief(value, limit: int = 60) -> str:
    """A short description of a (possibly huge or deeply nested) value, or of an exception, for a message."""
    if isinstance(value, (list, dict)):
        kind = "a list" if isinstance(value, list) else "an object"
        return f"{kind} of {len(value)} {'items' if isinstance(value, list) else 'fields'}"
    if isinstance(value, BaseException):
        text = " ".join(str(value).split())
    else:
        text = repr(value[:limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


@functools.cache
def _hints(cls) -> dict:
    """typing.get_type_hints of a dataclass, once (each call costs ~100 us)."""
    return typing.get_type_hints(cls)


def _expect(raw: dict, name: str, kind: type, where: str):
    value = raw.get(name)
    if not isinstance(value, kind):
        raise CacheFormatError(where, f"field {name}: expected {kind.__name__}")
    return value


def _parse(value, hint, name: str, where: str):
    """Check ``value`` against the type hint ``hint`` and build dataclasses; raises CacheFormatError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(value, inner, name, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise CacheFormatError(where, f"field {name}: expected an object")
        sub = _hints(hint)
        fields = {f.name: f for f in dataclasses.fields(hint)}
        unknown = set(value) - set(fields)
        if unknown:
            raise CacheFormatError(where, f"field {name}: unknown fields {_names(unknown)}")
        out = {}
        for fname, f in fields.items():
            if fname not in value:
                raise CacheFormatError(where, f"field {name}.{fname} is missing")
            out[fname] = _parse(value[fname], sub[fname], f"{name}.{fname}", where)
        try:
            return hint(**out)
        except (TypeError, ValueError) as e:
            raise CacheFormatError(where, f"field {name}: {_brief(e, 300)}") from None
    if origin is list:
        if not isinstance(value, list):
            raise CacheFormatError(where, f"field {name}: expected a list")
        if args[0] is str and set(map(type, value)) <= {str}:
            return list(value)  # a list of strings (data.sources) in one C loop, however long
        return [_parse(v, args[0], f"{name}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise CacheFormatError(where, f"field {name}: expected an object")
        if not args:
            return value
        return {str(k): _parse(v, args[1], f"{name}.{k}", where) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise CacheFormatError(where, f"field {name}: {value} is not a finite number")
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        if hint is int and value < 0:
            raise CacheFormatError(where, f"field {name}: negative value {value}")
        if hint is int and value > MAX_COUNT:
            raise _limit(where, name, value, MAX_COUNT, " (a signed 64-bit integer)")
        return value
    raise CacheFormatError(where, f"field {name}: expected {getattr(hint, '__name__', hint)}, got {_brief(value)}")


_SHARD_FIELDS = tuple(f.name for f in dataclasses.fields(ShardInfo))
_SHARD_KEYS = frozenset(_SHARD_FIELDS)
_SHARD_COUNTS = ("rows", "tokens", "target_positions", "target_entries", "bytes")


def _parse_shards(value, vocab_size: int, where: str) -> tuple[list[ShardInfo], Totals]:
    """The shard list and the sums of its counts, checked a column at a time by C loops (about 1 us an entry;
    ``_parse`` costs ~100 and only names the field of the first entry refused). Each entry's counts are checked
    against each other too: its target positions are some of its tokens, and a position holds at most
    min(65535, vocab_size) ids."""
    if not isinstance(value, list):
        raise CacheFormatError(where, "field shards: expected a list")
    if len(value) > MAX_SHARDS:
        raise _limit(where, "shards", value, MAX_SHARDS, " entries")

    def refuse(flags) -> None:
        """Refuse the first entry whose flag is true with _parse's error, which names the field."""
        i = _first(flags)
        _parse(value[i], ShardInfo, f"shards[{i}]", where)

    if not set(map(type, value)) <= {dict}:
        refuse(map(operator.is_not, map(type, value), repeat(dict)))
    if not all(map(operator.eq, map(dict.keys, value), repeat(_SHARD_KEYS))):
        refuse(map(operator.ne, map(dict.keys, value), repeat(_SHARD_KEYS)))
    columns = {name: list(map(operator.itemgetter(name), value)) for name in _SHARD_FIELDS}
    for name in _SHARD_FIELDS:
        kind = str if name in ("file", "sha256") else int
        if not set(map(type, columns[name])) <= {kind}:
            refuse(map(operator.is_not, map(type, columns[name]), repeat(kind)))
        if kind is int and value and (min(columns[name]) < 0 or max(columns[name]) > MAX_COUNT):
            refuse(map(lambda n: not 0 <= n <= MAX_COUNT, columns[name]))
    tokens, positions, entries = columns["tokens"], columns["target_positions"], columns["target_entries"]
    if (i := _first(map(operator.gt, positions, tokens))) is not None:
        raise CacheLimitError(where, f"field shards[{i}].target_positions: {positions[i]} is beyond the limit of "
                              f"{tokens[i]}, the shard's tokens (a target position is a token)", _LIMIT_FIX)
    per_position = min(MAX_TARGET_SIZE, vocab_size)
    if (i := _first(map(operator.gt, entries, map(operator.mul, positions, repeat(per_position))))) is not None:
        raise CacheLimitError(where, f"field shards[{i}].target_entries: {entries[i]} is beyond the limit of "
                              f"{positions[i] * per_position} ({positions[i]} target positions x {per_position} ids)",
                              _LIMIT_FIX)
    if not set(map(len, columns["sha256"])) <= {64}:
        i = _first(map(operator.ne, map(len, columns["sha256"]), repeat(64)))
        raise CacheFormatError(where, f"field shards[{i}].sha256: {_brief(value[i]['sha256'])} is not a SHA-256 "
                               "(64 hex digits)", _LIMIT_FIX)
    files = columns["file"]
    if len(set(files)) != len(files):
        seen = set()
        i = next(i for i, file in enumerate(files) if file in seen or seen.add(file))
        raise CacheFormatError(where, f"field shards[{i}].file: {_brief(files[i])} is listed twice", _LIMIT_FIX)
    return list(map(_shard_info, value)), Totals(*(sum(columns[name]) for name in _SHARD_COUNTS))


def _first(flags) -> int | None:
    """The index of the first true value of ``flags`` (a C loop), or None."""
    return next(itertools.compress(itertools.count(), flags), None)


def _shard_info(entry: dict) -> ShardInfo:
    """The ShardInfo of a checked entry (exactly its fields, of their types), made around the parsed dict
    itself: the frozen dataclass's __init__ costs four times as much (0.6 s more per million entries)."""
    info = object.__new__(ShardInfo)
    object.__setattr__(info, "__dict__", entry)
    return info


def _parse_layout(raw: dict, where: str, format_version: int) -> S.Layout:
    """The layout (of the manifest's format version), with its lists bounded before they are built, its
    values finite and its hidden layers distinct (a layer listed twice would be two columns of one name)."""
    layers, quantizer = raw.get("hidden_layers"), raw.get("quantizer")
    if isinstance(layers, list) and len(layers) > MAX_HIDDEN_LAYERS:
        raise _limit(where, "layout.hidden_layers", layers, MAX_HIDDEN_LAYERS, " layers")
    for name in ("starts", "steps"):
        values = quantizer.get(name) if isinstance(quantizer, dict) else None
        if isinstance(values, list) and len(values) > MAX_QUANTIZER_PIECES:
            raise _limit(where, f"layout.quantizer.{name}", values, MAX_QUANTIZER_PIECES, " pieces")
    try:
        layout = S.Layout.from_dict(raw, format_version)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CacheFormatError(where, f"field layout: {_brief(e, 300)}") from None
    q = layout.quantizer
    if not all(math.isfinite(x) for x in (*q.starts, *q.steps, q.max_nats)):
        raise CacheFormatError(where, "field layout.quantizer: a value is not a finite number", _LIMIT_FIX)
    if layout.hidden_width > MAX_HIDDEN_WIDTH:
        raise _limit(where, "layout.hidden_width", layout.hidden_width, MAX_HIDDEN_WIDTH)
    seen = set()
    for layer in layout.hidden_layers:
        if not 0 <= layer < MAX_HIDDEN_LAYERS:
            raise _limit(where, "layout.hidden_layers", layer, f"[0, {MAX_HIDDEN_LAYERS})", " for a layer index")
        if layer in seen:
            raise CacheFormatError(where, f"field layout.hidden_layers: layer {layer} is listed twice in "
                                   f"{list(layout.hidden_layers)}; each stored layer has one column",
                                   "rebuild the cache with distinct --hidden-layers")
        seen.add(layer)
    return layout


def check_limits(manifest: Manifest, cache_dir: str | os.PathLike) -> None:
    """Refuse what the field parsers leave: sizes that must agree with each other, and the vocabulary against
    the tokenizer files (CacheLimitError naming the manifest, the field, the value and the limit)."""
    where = str(Path(cache_dir) / MANIFEST_NAME)
    m, layout, targets = manifest, manifest.layout, manifest.targets
    if m.tokenizer.vocab_size != layout.vocab_size:
        raise CacheLimitError(where, f"field tokenizer.vocab_size: {m.tokenizer.vocab_size} differs from "
                              f"layout.vocab_size {layout.vocab_size} (both are the tokenizer's length)", _LIMIT_FIX)
    if not layout.vocab_size <= m.teacher.output_size <= MAX_OUTPUT_SIZE:
        raise _limit(where, "teacher.output_size", m.teacher.output_size,
                     f"[layout.vocab_size {layout.vocab_size}, {MAX_OUTPUT_SIZE}]", " (the logits hold every id)")
    stored = tokenizer_bytes(cache_dir)
    if stored is not None and layout.vocab_size > stored:
        raise _limit(where, "layout.vocab_size", layout.vocab_size, stored,
                     f" (the files of {TOKENIZER_DIR}/ hold {stored} bytes, and each token takes at least one)")
    for name in ("k", "min_k", "max_k"):
        value = getattr(targets, name)
        if value is not None and value > MAX_TARGET_SIZE:
            raise _limit(where, f"targets.{name}", value, MAX_TARGET_SIZE, " ids (target_sizes is uint16)")
    if targets.samples is not None and targets.samples > MAX_SAMPLES:
        raise _limit(where, "targets.samples", targets.samples, MAX_SAMPLES, " draws")
    if m.data.seq_len > MAX_SEQ_LEN:
        raise _limit(where, "data.seq_len", m.data.seq_len, MAX_SEQ_LEN, " tokens")
    if _deeper_than(m.extra, MAX_JSON_DEPTH - 1):  # the file's top object is the first level
        raise CacheLimitError(where, f"field extra: JSON nested deeper than the limit of {MAX_JSON_DEPTH} levels",
                              _LIMIT_FIX)


def tokenizer_bytes(cache_dir: str | os.PathLike) -> int | None:
    """Total size of the regular files directly in CACHE/tokenizer/, or None when the cache has no such
    directory or it cannot be listed. Links are followed (only to stat them): the code that opens the tokenizer
    refuses them, naming the link."""
    total = 0
    try:
        with os.scandir(Path(cache_dir) / TOKENIZER_DIR) as entries:
            for entry in entries:
                if entry.is_file():
                    total += entry.stat().st_size
    except OSError:
        return None
    return total


# ---------------------------------------------------------------------------------------------------
# Paths named by a manifest.


def _plain_parts(relative: str, where: str) -> list[str]:
    """The components of a manifest path; CachePathError unless it is a plain relative POSIX path ('.' and
    empty components are dropped, as PurePosixPath does)."""
    if len(relative) > MAX_PATH_CHARS:
        raise CachePathError(where, f"shard path {_brief(relative)} is longer than the limit of {MAX_PATH_CHARS} "
                             "characters")
    parts = [p for p in relative.split("/") if p and p != "."]
    if not parts or ".." in parts or relative.startswith("/") or "\\" in relative or "\x00" in relative:
        raise CachePathError(where, f"shard path {relative!r} is not a plain relative path inside the cache")
    return parts


def resolve_in_cache(cache_dir: str | os.PathLike, relative: str, where: str | None = None) -> Path:
    """Resolve a manifest path inside the cache; refuse anything that could point outside it. A reference to
    another cache's shard (``is_reference``) resolves inside that cache, which ``referenced_cache`` checks."""
    where = where or str(Path(cache_dir) / MANIFEST_NAME)
    if is_reference(relative):
        base, _, name = relative.rpartition(f"/{SHARDS_DIR}/")
        return resolve_in_cache(referenced_cache(cache_dir, base, where), f"{SHARDS_DIR}/{name}", where)
    _plain_parts(relative, where)
    root = Path(cache_dir).resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise CachePathError(where, f"shard path {relative!r} resolves outside the cache directory")
    return path


def confine_paths(cache_dir: str | os.PathLike, files: list[str], where: str) -> None:
    """``resolve_in_cache`` for every path of ``files`` at once, by C loops over the paths (0.6 s per million
    here, where resolving each costs 10 s): each distinct directory is resolved once and listed once, and only
    the listed files that are symbolic links are resolved one by one."""
    if (i := _first(map(operator.gt, map(len, files), repeat(MAX_PATH_CHARS)))) is not None:
        _plain_parts(files[i], where)  # raises
    matches = list(map(_PLAIN_PATH.fullmatch, files))
    references: dict[str, list[str]] = {}
    for relative in itertools.compress(files, map(operator.not_, matches)):
        if is_reference(relative):  # another cache's shard: confined to that cache, checked once per cache
            base, _, name = relative.rpartition(f"/{SHARDS_DIR}/")
            references.setdefault(base, []).append(f"{SHARDS_DIR}/{name}")
        else:
            resolve_in_cache(cache_dir, relative, where)  # another spelling ('a//b', './a'): refused or checked alone
    for base, names in references.items():
        confine_paths(referenced_cache(cache_dir, base, where), names, where)
    plain = list(itertools.compress(files, matches))
    root = os.path.realpath(cache_dir)
    inside = root if root.endswith(os.sep) else root + os.sep
    listed = None
    for directory in set(map(operator.itemgetter(0), map(str.rpartition, plain, repeat("/")))):
        real = os.path.realpath(os.path.join(root, directory)) if directory else root
        if real != root and not real.startswith(inside):
            example = next(f for f in plain if f.startswith(directory + "/"))
            raise CachePathError(where, f"shard path {example!r} resolves outside the cache directory")
        links = _symlink_names(real)
        if links is None:  # a directory that cannot be listed: ask each of its files
            links = [n for d, _, n in map(str.rpartition, plain, repeat("/")) if d == directory
                     and os.path.islink(os.path.join(real, n))]
        for name in links:  # a plain name in a directory inside the cache, not a link, stays inside
            relative = f"{directory}/{name}" if directory else name
            listed = set(plain) if listed is None else listed
            if relative in listed and not os.path.realpath(os.path.join(real, name)).startswith(inside):
                raise CachePathError(where, f"shard path {relative!r} resolves outside the cache directory")


_PLAIN_PATH = re.compile(r"(?:(?!\.\.?/)[^/\\\x00]+/)*(?!\.\.?$)[^/\\\x00]+")
"""A relative path of non-empty components, none of them '.' or '..', without backslashes or NULs."""
_REFERENCE = re.compile(r"(?:\.\./)+(?:(?!\.\.?/)[^/\\\x00]+/)+" + re.escape(SHARDS_DIR) + r"/[^/\\\x00]+\.arrow")
"""A reference to another cache's shard: one or more '..', the plain components that lead from there to the
other cache's directory (at least one), then shards/NAME.arrow."""


def is_reference(relative: str) -> bool:
    """Whether a manifest's shard path names a shard of another cache (written by ``teachercache merge``
    without --copy): ``../`` once or more, the path to that cache's directory, then ``shards/NAME.arrow``,
    e.g. ``../slice-0/shards/part-r000-00000.arrow``. Any other path must stay inside the cache."""
    return len(relative) <= MAX_PATH_CHARS and _REFERENCE.fullmatch(relative) is not None


REFERENCE_FIX = ("the merged cache reads its parts' shards where they lie: put the part back, or merge the parts "
                  "again with --copy")


def referenced_cache(cache_dir: str | os.PathLike, base: str, where: str) -> str:
    """The real path of the cache directory that a reference's ``base`` (its path up to /shards/) names from
    ``cache_dir``; CachePathError unless it is a complete cache (a directory holding manifest.json) on the
    filesystem of ``cache_dir`` itself. A reference never leaves the filesystem: a reader elsewhere may mount
    two filesystems apart, and a relative path across them would name another file or none."""
    root = os.path.realpath(cache_dir)
    other = os.path.realpath(os.path.join(root, base))
    try:
        devices = {os.stat(root).st_dev, os.stat(other).st_dev}
        shards = os.path.join(other, SHARDS_DIR)
        if os.path.isdir(shards):
            devices.add(os.stat(shards).st_dev)
    except OSError:
        raise CachePathError(where, f"shard path {base}/{SHARDS_DIR}/...: the cache it references, {other}, does "
                             "not exist", REFERENCE_FIX) from None
    if len(devices) > 1:
        raise CachePathError(where, f"shard path {base}/{SHARDS_DIR}/...: the cache it references, {other}, lies on "
                             "another filesystem; references stay within one filesystem", REFERENCE_FIX)
    if not os.path.isfile(os.path.join(other, MANIFEST_NAME)):
        raise CachePathError(where, f"shard path {base}/{SHARDS_DIR}/...: {other} is not a complete cache (it has "
                             f"no {MANIFEST_NAME}); a reference may only name another cache's shard", REFERENCE_FIX)
    return other


def _symlink_names(directory: str) -> list[str] | None:
    """The names of the symbolic links in ``directory``: none if it does not exist, None if it cannot be listed."""
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in entries if e.is_symlink()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------
# Fingerprints.


def _sha256_json(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a Hugging Face tokenizer's vocabulary (token -> id, added tokens included), its special
    tokens, and which of them are BOS, EOS and UNK (these change the ids a text becomes). The PAD role is
    left out on purpose: students often set pad = eos on their copy, which changes no token id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((str(t), tokenizer.convert_tokens_to_ids(t)) for t in tokenizer.all_special_tokens)
    roles = {role: str(getattr(tokenizer, role, None)) for role in ("bos_token", "eos_token", "unk_token")}
    return _sha256_json({"vocab": vocab, "special": special, "roles": roles})


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation", "_attn_implementation_autoset", "use_cache"}


def config_fingerprint(config) -> str:
    """Hash of a model config's architecture fields (dtype, paths and library versions left out)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _sha256_json({k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS})
