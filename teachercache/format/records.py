"""RowBatch <-> Arrow record batch: the columns of a shard, encoded and decoded.

The sparse targets go through teachercache.format.codec; the per-position columns are small fixed-point codes
(nats16 for log-probs and entropy, 1/65535 for the rest mass) and hidden states are raw 16-bit floats.
Decoding checks every list offset and every per-row length against the other columns, so a damaged
record batch is a CacheCorruptError naming the file, never an out-of-bounds read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from teachercache.errors import CacheCorruptError, CacheFormatError
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.codec import TargetStreams, decode_targets, encode_targets
from teachercache.format.references import position_contexts


def encode_nats16(values: np.ndarray, name: str, where: str) -> np.ndarray:
    """Non-negative nats (entropy, -log p) -> uint16 codes of 1/NATS16_SCALE nats, clipped at NATS16_MAX."""
    values = np.asarray(values, np.float64)
    if np.isnan(values).any():
        raise CacheFormatError(where, f"{name}: NaN values")
    return np.round(np.clip(values, 0.0, S.NATS16_MAX) * S.NATS16_SCALE).astype(np.uint16)


def encode_rest(rest: np.ndarray, where: str) -> np.ndarray:
    rest = np.asarray(rest, np.float64)
    if np.isnan(rest).any():
        raise CacheFormatError(where, f"{S.REST_MASS}: NaN values")
    return np.round(np.clip(rest, 0.0, 1.0) * S.REST_SCALE).astype(np.uint16)


def encode_float16(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> raw bits of bfloat16 (round to nearest even) or float16, as uint16."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    rounded[nan] = (bits[nan] >> 16) | 0x40  # keep NaN a NaN
    return rounded.astype(np.uint16)


def decode_float16(bits: np.ndarray, dtype: str) -> np.ndarray:
    bits = np.ascontiguousarray(bits, np.uint16)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def positions_of_rows(target_mask: np.ndarray, row_offsets: np.ndarray) -> np.ndarray:
    """(B+1,) int64 offsets of each row's target positions, from the per-token mask."""
    masked_before = np.concatenate([[0], np.cumsum(target_mask, dtype=np.int64)])
    return masked_before[np.asarray(row_offsets, np.int64)]


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType, where: str) -> pa.Array:
    if len(values) >= 2**31:
        raise CacheFormatError(where, f"a record batch holds {len(values)} values in one column; "
                               "write fewer rows per batch")
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, np.int32)), pa.array(values, type=value_type))


def encode_batch(batch: RowBatch, layout: S.Layout, where: str = "<batch>") -> pa.RecordBatch:
    """Encode a RowBatch into one Arrow record batch of the layout's schema."""
    row_offsets = np.asarray(batch.row_offsets, np.int64)
    mask = np.asarray(batch.target_mask, bool)
    if len(batch.input_ids) != row_offsets[-1] or len(mask) != row_offsets[-1]:
        raise CacheFormatError(where, f"{S.INPUT_IDS}/{S.TARGET_MASK}: lengths {len(batch.input_ids)}/"
                               f"{len(mask)} do not match row_offsets[-1] = {row_offsets[-1]}")
    row_positions = positions_of_rows(mask, row_offsets)
    n_pos = int(row_positions[-1])
    for name, arr in {S.LABEL_LOGPROB: batch.label_logprob, S.REST_MASS: batch.rest_mass,
                      S.ENTROPY: batch.entropy}.items():
        if arr is None or len(arr) != n_pos:
            raise CacheFormatError(where, f"{name}: expected {n_pos} values (one per target position), "
                                   f"got {None if arr is None else len(arr)}")
    if len(batch.target_offsets) != n_pos + 1:
        raise CacheFormatError(where, f"target_offsets: expected {n_pos + 1} offsets, "
                               f"got {len(batch.target_offsets)}")
    streams = encode_targets(row_positions, batch.target_offsets, batch.target_ids, batch.target_logprobs,
                             batch.target_counts, position_contexts(batch.input_ids, mask, row_offsets),
                             layout, where)
    sizes = np.diff(np.asarray(batch.target_offsets, np.int64)).astype(np.uint16)
    def per_position(values):
        return _list_array(row_positions, values, pa.uint16(), where)

    columns = {
        S.INPUT_IDS: _list_array(row_offsets, np.asarray(batch.input_ids, np.int32), pa.int32(), where),
        S.TARGET_MASK: _list_array(row_offsets, mask, pa.bool_(), where),
        S.TARGET_SIZES: per_position(sizes),
        S.LABEL_LOGPROB: per_position(encode_nats16(-np.asarray(batch.label_logprob), S.LABEL_LOGPROB, where)),
        S.REST_MASS: per_position(encode_rest(batch.rest_mass, where)),
        S.ENTROPY: per_position(encode_nats16(batch.entropy, S.ENTROPY, where)),
        S.TARGET_IDS: _list_array(streams.id_offsets, streams.ids, pa.uint8(), where),
        S.TARGET_VALUES: _list_array(streams.value_offsets, streams.values, pa.uint8(), where),
        S.TARGET_HITS: _list_array(streams.hit_offsets, streams.hits, pa.uint8(), where),
        S.TARGET_REFS: _list_array(streams.ref_offsets, streams.refs, pa.uint8(), where),
    }
    if layout.sampled:
        columns[S.TARGET_COUNTS] = _list_array(streams.count_offsets, streams.counts, pa.uint8(), where)
    for layer in layout.hidden_layers:
        h = batch.hidden.get(layer)
        if h is None or h.shape != (n_pos, layout.hidden_width):
            raise CacheFormatError(where, f"{S.hidden_column(layer)}: expected shape "
                                   f"({n_pos}, {layout.hidden_width}), got {None if h is None else h.shape}")
        columns[S.hidden_column(layer)] = _list_array(
            row_positions * layout.hidden_width, encode_float16(h, layout.hidden_dtype).reshape(-1),
            pa.uint16(), where)
    return pa.RecordBatch.from_arrays([columns[name] for name in layout.columns()], schema=layout.schema())


def _parts(rb: pa.RecordBatch, name: str, where: str, expect_rows: np.ndarray | None = None):
    """(values numpy, row offsets relative to the first value) of a list column, checked for sane offsets."""
    if name not in rb.schema.names:
        raise CacheFormatError(where, f"column {name} is missing")
    col = rb.column(name)
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    if (len(offsets) != rb.num_rows + 1 or (np.diff(offsets) < 0).any() or offsets[0] < 0
            or offsets[-1] > len(values)):
        raise CacheCorruptError(where, f"column {name}: list offsets are inconsistent")
    if expect_rows is not None and not np.array_equal(np.diff(offsets), expect_rows):
        raise CacheCorruptError(where, f"column {name}: per-row lengths disagree with the other columns")
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def record_streams(rb: pa.RecordBatch, layout: S.Layout, where: str = "<batch>") -> TargetStreams:
    """The encoded target streams of a record batch, as numpy views (no decoding)."""
    def stream(name):
        values, rel = _parts(rb, name, where)
        return np.ascontiguousarray(values, np.uint8), rel

    counts = stream(S.TARGET_COUNTS) if layout.sampled else (np.zeros(0, np.uint8),
                                                             np.zeros(rb.num_rows + 1, np.int64))
    return TargetStreams(*stream(S.TARGET_IDS), *stream(S.TARGET_VALUES), *stream(S.TARGET_HITS),
                         *stream(S.TARGET_REFS), *counts)


def decode_batch(rb: pa.RecordBatch, layout: S.Layout, where: str = "<batch>") -> RowBatch:
    """Decode an Arrow record batch (all columns, or any subset of them) into a RowBatch.

    Columns absent from ``rb`` are left as None. Decoding the targets needs target_sizes, the target
    streams, input_ids and target_mask (the shard reader adds the last two when targets are asked for).
    """
    names = set(rb.schema.names)
    out = RowBatch(row_offsets=np.zeros(rb.num_rows + 1, np.int64))
    row_lengths = None
    for name in (S.INPUT_IDS, S.TARGET_MASK):
        if name in names:
            values, out.row_offsets = _parts(rb, name, where, row_lengths)
            row_lengths = np.diff(out.row_offsets)
            setattr(out, name, values.astype(np.int32 if name == S.INPUT_IDS else bool, copy=False))
    pos_lengths = None
    if out.target_mask is not None:
        pos_lengths = np.diff(positions_of_rows(out.target_mask, out.row_offsets))
    sizes = None
    for name in (S.TARGET_SIZES, S.LABEL_LOGPROB, S.REST_MASS, S.ENTROPY):
        if name not in names:
            continue
        values, out.row_positions = _parts(rb, name, where, pos_lengths)
        pos_lengths = np.diff(out.row_positions)
        if name == S.TARGET_SIZES:
            sizes = values
        elif name == S.REST_MASS:
            out.rest_mass = (values / np.float32(S.REST_SCALE)).astype(np.float32)
        else:
            nats = (values / np.float32(S.NATS16_SCALE)).astype(np.float32)
            setattr(out, name, -nats if name == S.LABEL_LOGPROB else nats)
    if sizes is not None and S.TARGET_IDS in names:
        if out.input_ids is None or out.target_mask is None:
            raise CacheFormatError(where, f"decoding targets needs the {S.INPUT_IDS} and {S.TARGET_MASK} columns")
        contexts = position_contexts(out.input_ids, out.target_mask, out.row_offsets)
        out.target_offsets, out.target_ids, out.target_logprobs, out.target_counts = decode_targets(
            sizes, out.row_positions, contexts, record_streams(rb, layout, where), layout, where)
    elif sizes is not None:
        out.target_offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    for layer in layout.hidden_layers:
        name = S.hidden_column(layer)
        if name in names:
            width = layout.hidden_width
            values, _ = _parts(rb, name, where, None if pos_lengths is None else pos_lengths * width)
            if len(values) % width:
                raise CacheCorruptError(where, f"column {name}: length is not a multiple of {width}")
            out.hidden[layer] = decode_float16(values, layout.hidden_dtype).reshape(-1, width)
    return out
