"""Encode and decode the sparse targets of a record batch (docs/FORMAT.md): the codec of the layout's format
version.

A layout carries its format version (``Layout.format_version``, the manifest's ``format_version``). New
caches are written in version 3 (teachercache.format.codec3 and its codec3_encode, codec3_decode); caches of version 2 (codec2) are still read,
and can be written too, for tests and for tools that compare the two. Both turn the CSR targets of a record
batch into the same five byte streams (``TargetStreams``: target_ids, target_values, target_hits,
target_refs, target_counts) and back. Each numba kernel has a plain Python reference (codec2's
``*_reference_v2``, codec3_reference), compared byte for byte by the tests.
"""

from __future__ import annotations

from teachercache.format import codec2, codec3_decode, codec3_encode, codec3_reference
from teachercache.format import schema as S
from teachercache.format.streams import TargetStreams

__all__ = ["TargetStreams", "decode_targets", "decode_targets_reference", "encode_targets",
           "encode_targets_reference"]


def encode_targets(row_positions, target_offsets, ids, logprobs, counts, contexts, layout: S.Layout,
                   where: str = "<batch>") -> TargetStreams:
    """Encode the CSR targets of a record batch into the streams of ``layout.format_version``.

    ``contexts`` is (cur, prev) from references.position_contexts(); ``counts`` is None unless layout.sampled.
    Bad targets raise CacheFormatError naming ``where`` and the target position.
    """
    encode = codec3_encode.encode_targets if layout.format_version == 3 else codec2.encode_targets_v2
    return encode(row_positions, target_offsets, ids, logprobs, counts, contexts, layout, where)


def decode_targets(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout,
                   where: str = "<batch>"):
    """Decode a record batch's streams (of ``layout.format_version``) back to CSR: (target_offsets, ids int32,
    logprobs float32, counts int32 | None), entries of each position in canonical order. Damaged streams
    raise CacheCorruptError naming ``where``."""
    decode = codec3_decode.decode_targets if layout.format_version == 3 else codec2.decode_targets_v2
    return decode(sizes, row_positions, contexts, streams, layout, where)


def encode_targets_reference(row_positions, target_offsets, ids, logprobs, counts, contexts,
                             layout: S.Layout) -> TargetStreams:
    """Plain Python reference of encode_targets (the same bytes; no input checks)."""
    encode = codec3_reference.encode_targets_reference if layout.format_version == 3 else \
        codec2.encode_targets_reference_v2
    return encode(row_positions, target_offsets, ids, logprobs, counts, contexts, layout)


def decode_targets_reference(sizes, row_positions, contexts, streams: TargetStreams, layout: S.Layout):
    """Plain Python reference of decode_targets for well-formed streams (no bounds checks)."""
    decode = codec3_reference.decode_targets_reference if layout.format_version == 3 else \
        codec2.decode_targets_reference_v2
    return decode(sizes, row_positions, contexts, streams, layout)
