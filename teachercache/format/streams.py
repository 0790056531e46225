"""The encoded target streams of a record batch, shared by the codecs of every format version.

``TargetStreams`` holds the five byte streams (columns target_ids, target_values, target_hits, target_refs,
target_counts) with per-row offsets; ``STATUS_TEXT`` says what each status code of the numba kernels means;
``check_encode_inputs`` and ``stream_slices`` are the checks every encoder and decoder makes at its boundary.
The codecs themselves: teachercache.format.codec (version 2) and teachercache.format.codec3 (version 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teachercache.errors import CacheCorruptError, CacheFormatError
from teachercache.format import schema as S

OK = 0
STATUS_TEXT = {
    1: "a stored id is outside the vocabulary",
    2: "a position stores the same id twice",
    3: "a log-probability is NaN or positive",
    4: "a position stores more than 65535 ids",
    5: "a draw count is outside [1, 65535]",
    6: "a context token is outside the vocabulary",
    11: "the id stream's length is not a whole number of symbols",
    13: "a varint is malformed or runs past its stream",
    14: "a value code is beyond the quantiser's range",
    15: "the value stream has bytes left over",
    16: "the count stream ends early or holds a malformed varint",
    17: "the count or ref stream has bytes left over",
    18: "a decoded id is outside the vocabulary",
    19: "a reference points outside its reference list",
    20: "the id stream holds more or fewer symbols than the row's misses",
    21: "the hit bitmap's length does not match the row's entries",
    22: "the hit bitmap has bits set past the row's last entry",
    23: "an entry is marked a hit but its position has no reference",
    # version 3 (teachercache.format.codec3)
    30: f"{S.TARGET_REFS}: a reference selector is beyond 7",
    31: f"{S.TARGET_REFS}: the stream is shorter than one selector per target position",
    32: f"{S.TARGET_VALUES}: the group header is malformed or the groups' tokens run past the stream",
    33: f"{S.TARGET_VALUES}: a group's tokens end before its entries do",
    34: f"{S.TARGET_VALUES}: a group has tokens left over, or a pair token's second delta has no entry",
    35: f"{S.TARGET_VALUES}: an escaped delta is malformed, or escaped deltas are left over",
    36: f"{S.TARGET_IDS}: the header is malformed or the table and planes do not add up to the stream",
    37: f"{S.TARGET_IDS}: a miss refers to a rank beyond the id table",
    38: f"{S.TARGET_IDS}: the misses use more or fewer symbols than the stream holds",
    39: "a batch without target positions has non-empty target streams",
    40: f"{S.TARGET_VALUES}: the number of groups does not fit the batch's largest target size",
}


@dataclass
class TargetStreams:
    """The encoded per-row byte streams of a record batch; offsets are (B+1,) int64 byte offsets.

    Version 2 streams are per row; a version 3 stream belongs to the whole record batch and is its first
    row's list (the other rows' lists are empty), see docs/FORMAT.md."""

    ids: np.ndarray
    id_offsets: np.ndarray
    values: np.ndarray
    value_offsets: np.ndarray
    hits: np.ndarray
    hit_offsets: np.ndarray
    refs: np.ndarray
    ref_offsets: np.ndarray
    counts: np.ndarray
    count_offsets: np.ndarray

    FIELDS = ("ids", "id_offsets", "values", "value_offsets", "hits", "hit_offsets", "refs", "ref_offsets",
              "counts", "count_offsets")
    STREAMS = ("ids", "values", "hits", "refs", "counts")


def check_encode_inputs(row_positions, target_offsets, ids, logprobs, counts, contexts, layout: S.Layout,
                        where: str):
    """The encoders' inputs as contiguous arrays, checked: (row_positions, target_offsets, ids int64,
    logprobs float32, counts int64 (empty unless sampled), cur, prev). Raises CacheFormatError."""
    row_positions = np.ascontiguousarray(row_positions, np.int64)
    target_offsets = np.ascontiguousarray(target_offsets, np.int64)
    ids = np.ascontiguousarray(ids, np.int64)
    logprobs = np.ascontiguousarray(logprobs, np.float32)
    cur, prev = (np.ascontiguousarray(c, np.int64) for c in contexts)
    has_counts = counts is not None
    if layout.sampled != has_counts:
        raise CacheFormatError(where, f"{S.TARGET_COUNTS}: the layout says sampled={layout.sampled} "
                               f"but counts were {'given' if has_counts else 'not given'}")
    counts = np.ascontiguousarray(counts if has_counts else np.zeros(0), np.int64)
    n_pos, n_entries = len(target_offsets) - 1, len(ids)
    if len(cur) != n_pos or len(prev) != n_pos:
        raise CacheFormatError(where, f"contexts: expected {n_pos} per position, got {len(cur)}/{len(prev)}")
    for name, offsets, end in (("target_offsets", target_offsets, n_entries), ("row_positions", row_positions, n_pos)):
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != end or (np.diff(offsets) < 0).any():
            raise CacheFormatError(where, f"{name}: offsets must rise from 0 to {end}")
    if len(logprobs) != n_entries or len(counts) != (n_entries if has_counts else 0):
        raise CacheFormatError(where, f"target_logprobs/target_counts: expected {n_entries} values")
    return row_positions, target_offsets, ids, logprobs, counts, cur, prev


def stream_offsets(streams: TargetStreams) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(offsets int64, stream uint8), ...] of the five streams, in TargetStreams.STREAMS order."""
    return [(np.asarray(getattr(streams, name[:-1] + "_offsets"), np.int64),
             np.ascontiguousarray(getattr(streams, name), np.uint8)) for name in TargetStreams.STREAMS]


def check_decode_inputs(sizes, row_positions, contexts, streams: TargetStreams, where: str):
    """The decoders' inputs as contiguous arrays, checked: (sizes uint16, row_positions, cur, prev, target
    offsets, [(offsets, stream) x 5]). Raises CacheCorruptError when the offsets disagree."""
    sizes = np.ascontiguousarray(sizes, np.uint16)
    row_positions = np.ascontiguousarray(row_positions, np.int64)
    cur, prev = (np.ascontiguousarray(c, np.int64) for c in contexts)
    target_offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=target_offsets[1:])
    pairs = stream_offsets(streams)
    if (len(row_positions) == 0 or row_positions[0] != 0 or row_positions[-1] != len(sizes)
            or (np.diff(row_positions) < 0).any() or len(cur) != len(sizes) or len(prev) != len(sizes)
            or any(len(o) != len(row_positions) or o[0] < 0 or o[-1] > len(s) or (np.diff(o) < 0).any()
                   for o, s in pairs)):
        raise CacheCorruptError(where, "per-row offsets of the target streams are inconsistent")
    return sizes, row_positions, cur, prev, target_offsets, pairs
