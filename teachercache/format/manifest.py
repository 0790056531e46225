"""manifest.json: the record of a complete cache, and the fingerprints that tie it to its teacher.

The manifest is written last, atomically (temporary name, fsync, rename): its presence means the cache is
complete. It holds the format version, the layout needed to decode the shards, what the targets are, which
teacher and tokenizer produced them, what data went in, and every shard with its size and SHA-256.

Parsing is strict: a missing field (defaults are never filled in on reading), an unknown field or a
value of the wrong type is a CacheFormatError naming the field, so a hand-edited manifest cannot silently mean something else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from teachercache.errors import CacheFormatError, CacheIncompleteError, CachePathError, CacheVersionError
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
    format_version: int = S.FORMAT_VERSION

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layout"] = self.layout.to_dict()
        for name in ("targets", "teacher", "tokenizer", "data", "totals"):
            d[name] = dataclasses.asdict(d[name])
        d["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return d


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


def read_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """Read and check CACHE/manifest.json; every problem is a CacheError naming the file and field."""
    path = Path(cache_dir) / MANIFEST_NAME
    where = str(path)
    if not Path(cache_dir).is_dir():
        raise CacheIncompleteError(cache_dir, "is not a directory", "give the cache directory")
    if not path.is_file():
        raise CacheIncompleteError(where, "missing: the cache is incomplete (its build did not finish)",
                                   "finish it with `teachercache build --resume`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFormatError(where, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != S.FORMAT_NAME:
        raise CacheFormatError(where, f"field format: expected {S.FORMAT_NAME!r}")
    version = raw.get("format_version")
    if type(version) is not int or version != S.FORMAT_VERSION:
        raise CacheVersionError(where, f"field format_version: {version!r}, this reader reads version "
                                f"{S.FORMAT_VERSION}", S.version_hint(version))
    try:
        layout = S.Layout.from_dict(_expect(raw, "layout", dict, where))
    except (KeyError, TypeError, ValueError) as e:
        raise CacheFormatError(where, f"field layout: {e}") from None
    values = {"layout": layout}
    hints = typing.get_type_hints(Manifest)
    for f in dataclasses.fields(Manifest):
        if f.name == "layout":
            continue
        if f.name not in raw:
            raise CacheFormatError(where, f"field {f.name} is missing")
        values[f.name] = _parse(raw[f.name], hints[f.name], f.name, where)
    unknown = set(raw) - {f.name for f in dataclasses.fields(Manifest)}
    if unknown:
        raise CacheFormatError(where, f"unknown fields {sorted(unknown)}")
    try:
        manifest = Manifest(**values)
    except (TypeError, ValueError) as e:
        raise CacheFormatError(where, str(e)) from None
    if manifest.totals != Totals.of(manifest.shards):
        raise CacheFormatError(where, "field totals: does not equal the sum over the shards")
    for shard in manifest.shards:
        resolve_in_cache(cache_dir, shard.file, where)
    return manifest


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
        sub = typing.get_type_hints(hint)
        fields = {f.name: f for f in dataclasses.fields(hint)}
        unknown = set(value) - set(fields)
        if unknown:
            raise CacheFormatError(where, f"field {name}: unknown fields {sorted(unknown)}")
        out = {}
        for fname, f in fields.items():
            if fname not in value:
                raise CacheFormatError(where, f"field {name}.{fname} is missing")
            out[fname] = _parse(value[fname], sub[fname], f"{name}.{fname}", where)
        try:
            return hint(**out)
        except (TypeError, ValueError) as e:
            raise CacheFormatError(where, f"field {name}: {e}") from None
    if origin is list:
        if not isinstance(value, list):
            raise CacheFormatError(where, f"field {name}: expected a list")
        return [_parse(v, args[0], f"{name}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise CacheFormatError(where, f"field {name}: expected an object")
        if not args:
            return value
        return {str(k): _parse(v, args[1], f"{name}.{k}", where) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        if hint is int and value < 0:
            raise CacheFormatError(where, f"field {name}: negative value {value}")
        return value
    raise CacheFormatError(where, f"field {name}: expected {getattr(hint, '__name__', hint)}, got {value!r:.60}")


def resolve_in_cache(cache_dir: str | os.PathLike, relative: str, where: str | None = None) -> Path:
    """Resolve a manifest path inside the cache; refuse anything that could point outside it."""
    where = where or str(Path(cache_dir) / MANIFEST_NAME)
    parts = PurePosixPath(relative).parts
    if (not relative or "\\" in relative or "\x00" in relative or PurePosixPath(relative).is_absolute()
            or ".." in parts or not parts):
        raise CachePathError(where, f"shard path {relative!r} is not a plain relative path inside the cache")
    root = Path(cache_dir).resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise CachePathError(where, f"shard path {relative!r} resolves outside the cache directory")
    return path


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
