"""RowBatch: decoded rows of a cache in memory, as flat numpy arrays (CSR style).

This is what the teacher pass hands to the codec, and what a reader hands to a student or an inspection
tool. Shapes: B rows, T tokens in all, P target positions in all (tokens whose ``target_mask`` is set),
E stored entries in all. Per-position arrays follow the positions in token order, row after row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RowBatch:
    row_offsets: np.ndarray
    """(B+1,) int64: the tokens of row b are input_ids[row_offsets[b]:row_offsets[b+1]]."""
    input_ids: np.ndarray | None = None
    """(T,) int32 token ids."""
    target_mask: np.ndarray | None = None
    """(T,) bool: True where the teacher's distribution of the NEXT token is stored."""
    row_positions: np.ndarray | None = None
    """(B+1,) int64: the target positions of row b are [row_positions[b], row_positions[b+1])."""
    target_offsets: np.ndarray | None = None
    """(P+1,) int64: the entries of target position j are [target_offsets[j], target_offsets[j+1])."""
    target_ids: np.ndarray | None = None
    """(E,) int32 stored token ids; decoded in descending log-prob order, ties by ascending id."""
    target_logprobs: np.ndarray | None = None
    """(E,) float32 teacher log-probs (over the full vocabulary) of the stored ids."""
    target_counts: np.ndarray | None = None
    """(E,) int32 draw counts of sampled targets; None for top-k and nucleus."""
    label_logprob: np.ndarray | None = None
    """(P,) float32 teacher log-prob of the actual next token, stored or not."""
    rest_mass: np.ndarray | None = None
    """(P,) float32 teacher probability mass outside the stored ids: 1 - sum(exp(target_logprobs))."""
    entropy: np.ndarray | None = None
    """(P,) float32 teacher entropy (nats) over the full vocabulary."""
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    """layer -> (P, H) float32 teacher hidden states at the target positions."""

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def num_positions(self) -> int:
        if self.target_offsets is not None:
            return len(self.target_offsets) - 1
        return int(self.row_positions[-1]) if self.row_positions is not None else 0

    @property
    def num_entries(self) -> int:
        return int(self.target_offsets[-1]) if self.target_offsets is not None else 0

    @property
    def target_sizes(self) -> np.ndarray:
        """(P,) number of stored entries per target position."""
        return np.diff(self.target_offsets)
