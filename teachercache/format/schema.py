"""The cache format, defined once: version, column names, the Arrow schema of a shard, and the parameters
of the physical encoding.

One Arrow row is one training sequence exactly as the teacher saw it. Per-token columns hold T values per
row; per-position columns hold one value per *target position* (a token t with ``target_mask[t]`` set,
whose stored distribution is the teacher's prediction of token t+1), in token order. The sparse targets
are CSR-style: ``target_sizes`` gives the number of stored ids of each target position, and the id,
value and count streams hold the entries of the row's positions one after another. docs/FORMAT.md
describes every column byte by byte; teachercache.format.codec implements it.

Nothing else in the package spells a column name as a string literal: import the constants below.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import pyarrow as pa

FORMAT_NAME = "teachercache"
FORMAT_VERSION = 3
"""The version new caches are written in. Version 3 (2026-12-08): the target streams of docs/FORMAT.md
("Version 3"); the same columns as version 2. Version 2 (2026-11-29): hits bitmap + ranks replaced
version 1's one varint per entry in target_refs."""
READABLE_VERSIONS = (2, 3)
"""The versions this release opens and decodes: a cache is never rebuilt for a library upgrade."""


def readable_versions_text() -> str:
    """'versions 2 and 3', for messages."""
    *head, last = (str(v) for v in READABLE_VERSIONS)
    return f"versions {', '.join(head)} and {last}" if head else f"version {last}"


def version_hint(version) -> str:
    """What to do with a cache of a format version this release does not read."""
    if type(version) is int and 1 <= version < min(READABLE_VERSIONS):
        return (f"it was written by an older teachercache (format {version}); rebuild it with this one, "
                "or read it with the release that wrote it")
    return "use a teachercache release that reads it"


# Keys of the Arrow schema metadata of every shard.
META_FORMAT = b"teachercache.format"
META_VERSION = b"teachercache.format_version"
META_LAYOUT = b"teachercache.layout"

# Per-token columns (T values per row).
INPUT_IDS = "input_ids"          # list<int32>: token ids
TARGET_MASK = "target_mask"      # list<bool>: which positions carry a stored target
# Per-target-position columns (P values per row).
TARGET_SIZES = "target_sizes"    # list<uint16>: number of stored ids per target position
LABEL_LOGPROB = "label_logprob"  # list<uint16>: teacher log-prob of the actual next token (nats16 code)
REST_MASS = "rest_mass"          # list<uint16>: teacher mass outside the stored ids (round(rest * 65535))
ENTROPY = "entropy"              # list<uint16>: teacher entropy over the full vocabulary (nats16 code)
# Per-entry streams (encoded bytes, see teachercache.format.codec; docs/FORMAT.md gives both versions).
# Decoding them needs input_ids and target_mask too: they pick each position's reference position. In
# version 3 each is one stream of the record batch, in its first row's list; in version 2 one per row.
TARGET_IDS = "target_ids"        # list<uint8>: the misses' ids (v3: a table and ranks; v2: byte planes)
TARGET_VALUES = "target_values"  # list<uint8>: quantised -log-prob deltas (v3: tokens by group; v2: varints)
TARGET_HITS = "target_hits"      # list<uint8>: bitmap, one bit per entry (LSB first): 1 = hit
TARGET_REFS = "target_refs"      # list<uint8>: (v3: a selector byte per position, then) a rank varint per hit
TARGET_COUNTS = "target_counts"  # list<uint8>: LEB128 varints of (draw count - 1); sampled targets only
TARGET_STREAMS = (TARGET_IDS, TARGET_VALUES, TARGET_HITS, TARGET_REFS, TARGET_COUNTS)
HIDDEN_PREFIX = "hidden_"        # list<uint16>: P*H raw 16-bit floats per row, one column per layer

TARGET_KINDS = ("topk", "nucleus", "sample")
HIDDEN_DTYPES = ("bfloat16", "float16")

# The "nats16" fixed-point code used by label_logprob and entropy: value = code / NATS16_SCALE nats.
NATS16_SCALE = 1024.0
NATS16_MAX = 65535 / NATS16_SCALE
# rest_mass code: value = code / REST_SCALE.
REST_SCALE = 65535.0


def hidden_column(layer: int) -> str:
    """Column name of the hidden states of teacher layer ``layer`` (0 = embeddings output)."""
    return f"{HIDDEN_PREFIX}{layer}"


@dataclass(frozen=True)
class Quantizer:
    """Piecewise-uniform quantiser of x = -log p (nats) into integer codes.

    Piece i covers x in [starts[i], starts[i+1]) with step steps[i]; the last piece runs to ``max_nats``,
    where x is clipped (p = 0 is stored as exp(-max_nats)). The maximum error of piece i is steps[i] / 2.
    Each piece's width must be a whole number of its steps, so every code decodes to a single value and
    the code is monotone in x. The defaults were chosen by tools/bench_codec.py (see docs/FORMAT.md).
    """

    starts: tuple[float, ...] = (0.0, 1.0, 9.5)
    """Start of each piece, in nats of -log p; the first must be 0."""
    steps: tuple[float, ...] = (1.0 / 128, 1.0 / 26, 0.25)
    """Step of each piece, in nats."""
    max_nats: float = 80.0
    """Values of -log p above this are clipped to it."""

    def __post_init__(self):
        if len(self.starts) != len(self.steps) or not self.starts or self.starts[0] != 0.0:
            raise ValueError(f"Quantizer: starts {self.starts} and steps {self.steps} must pair up from 0.0")
        edges = list(self.starts) + [self.max_nats]
        for a, b, s in zip(edges, edges[1:], self.steps):
            n = (b - a) / s
            if s <= 0 or b <= a or abs(n - round(n)) > 1e-9:
                raise ValueError(f"Quantizer: piece [{a}, {b}) is not a whole number of steps of {s}")
        if self.bases()[-1] >= 1 << 20:
            raise ValueError(f"Quantizer: {self.bases()[-1] + 1} codes; at most 2**20 fit the format")

    def bases(self) -> tuple[int, ...]:
        """The code of each piece's start, and after them the largest code."""
        edges = list(self.starts) + [self.max_nats]
        out = [0]
        for a, b, s in zip(edges, edges[1:], self.steps):
            out.append(out[-1] + round((b - a) / s))
        return tuple(out)

    def max_error(self, x: float) -> float:
        """The largest decoding error (nats) for a value of -log p equal to ``x``."""
        for a, s in reversed(list(zip(self.starts, self.steps))):
            if x >= a:
                return s / 2
        return self.steps[0] / 2


@dataclass(frozen=True)
class Layout:
    """Everything needed to decode a shard, stored in its schema metadata and in the manifest."""

    vocab_size: int
    """Number of ids a target may hold (the teacher tokenizer's vocabulary, padding excluded)."""
    sampled: bool = False
    """True for sampled targets: a draw count is stored per entry (column target_counts)."""
    hidden_layers: tuple[int, ...] = ()
    """Teacher layers whose hidden states are stored, one column each."""
    hidden_width: int = 0
    """Width H of the stored hidden states."""
    hidden_dtype: str = "bfloat16"
    """16-bit float type of the stored hidden states: bfloat16 or float16."""
    quantizer: Quantizer = field(default_factory=Quantizer)
    """How -log p of the stored entries is quantised."""
    format_version: int = FORMAT_VERSION
    """How the target streams are encoded (one of READABLE_VERSIONS). Not part of the layout JSON: it is
    the manifest's ``format_version`` and each shard's ``teachercache.format_version`` metadata."""

    def __post_init__(self):
        if self.format_version not in READABLE_VERSIONS:
            raise ValueError(f"Layout: format_version {self.format_version!r} is not one of {READABLE_VERSIONS}")
        if not 1 <= self.vocab_size <= 1 << 24:
            raise ValueError(f"Layout: vocab_size {self.vocab_size} must be in [1, 2**24]")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"Layout: hidden_dtype {self.hidden_dtype!r} must be one of {HIDDEN_DTYPES}")
        if self.hidden_layers and self.hidden_width <= 0:
            raise ValueError("Layout: hidden_layers given but hidden_width is not positive")

    @property
    def id_bytes(self) -> int:
        """Bytes per id symbol: enough for vocab_size - 1."""
        return max(1, math.ceil(max(1, (self.vocab_size - 1).bit_length()) / 8))

    def columns(self) -> list[str]:
        names = [INPUT_IDS, TARGET_MASK, TARGET_SIZES, LABEL_LOGPROB, REST_MASS, ENTROPY,
                 TARGET_IDS, TARGET_VALUES, TARGET_HITS, TARGET_REFS]
        if self.sampled:
            names.append(TARGET_COUNTS)
        names += [hidden_column(layer) for layer in self.hidden_layers]
        return names

    def schema(self) -> pa.Schema:
        types = {INPUT_IDS: pa.int32(), TARGET_MASK: pa.bool_(), TARGET_SIZES: pa.uint16(),
                 LABEL_LOGPROB: pa.uint16(), REST_MASS: pa.uint16(), ENTROPY: pa.uint16(),
                 **{name: pa.uint8() for name in TARGET_STREAMS}}
        fields = [pa.field(name, pa.list_(types.get(name, pa.uint16())), nullable=False)
                  for name in self.columns()]
        meta = {META_FORMAT: FORMAT_NAME.encode(), META_VERSION: str(self.format_version).encode(),
                META_LAYOUT: json.dumps(self.to_dict(), sort_keys=True).encode()}
        return pa.schema(fields, metadata=meta)

    def to_dict(self) -> dict:
        """The layout JSON of the manifest and the shards' metadata (without format_version, stored beside it)."""
        d = asdict(self)
        del d["format_version"]
        d["hidden_layers"] = list(self.hidden_layers)
        d["quantizer"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["quantizer"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, format_version: int = FORMAT_VERSION) -> "Layout":
        """Build from a dict (manifest or schema metadata) and the format version stored beside it; raises
        KeyError/TypeError/ValueError on bad input."""
        q = d["quantizer"]
        quantizer = Quantizer(starts=tuple(float(x) for x in q["starts"]),
                              steps=tuple(float(x) for x in q["steps"]), max_nats=float(q["max_nats"]))
        return cls(vocab_size=int(d["vocab_size"]), sampled=bool(d["sampled"]),
                   hidden_layers=tuple(int(x) for x in d["hidden_layers"]),
                   hidden_width=int(d["hidden_width"]), hidden_dtype=str(d["hidden_dtype"]),
                   quantizer=quantizer, format_version=format_version)
