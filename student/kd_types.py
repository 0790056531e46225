"""What the sparse KD losses take: the teacher's targets of N positions (``SparseTargets``, CSR style), the
loss configuration (``KDConfig``) and the checks a kernel relies on (``check_targets``).

Shared by the loss kernels (student.losses), the chunked head (student.fused_head), the batch
(student.collate) and the options (student.options); docs/losses.md defines every loss and tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "sampled_ce")
TAILS = ("rest", "renormalize")
PROB_FLOOR = 1e-12
"""Teacher probabilities below this are raised to it inside reverse_kl's log (a p_b = 0 bucket)."""

@dataclass
class SparseTargets:
    """Sparse teacher targets for N positions, CSR style (all tensors on one device).

    offsets (N+1,) int64; ids (E,) int64, distinct within a position; logprobs (E,) float32 teacher
    log-probs over its full vocabulary; rest (N,) float32 rest mass (needed by tail ``rest``); counts
    (E,) float32 draw counts (needed by ``sampled_ce``).
    """

    offsets: torch.Tensor
    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def num_positions(self) -> int:
        return self.offsets.numel() - 1

    def slice(self, start: int, stop: int) -> "SparseTargets":
        """Positions [start, stop) as their own SparseTargets (views where possible)."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return SparseTargets(self.offsets[start:stop + 1] - a, self.ids[a:b], self.logprobs[a:b],
                             None if self.rest is None else self.rest[start:stop],
                             None if self.counts is None else self.counts[a:b])

    def to(self, device) -> "SparseTargets":
        def move(t):
            return None if t is None else t.to(device)
        return SparseTargets(move(self.offsets), move(self.ids), move(self.logprobs), move(self.rest),
                             move(self.counts))


@dataclass(frozen=True)
class KDConfig:
    """What to compute: loss name, tail policy, temperature, the loss parameters and the two weights."""

    loss: str = "forward_kl"
    tail: str = "rest"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    ce_weight: float = 0.0
    kd_weight: float = 1.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown KD loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.tail not in TAILS:
            raise ValueError(f"unknown tail policy {self.tail!r}: choose one of {', '.join(TAILS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.beta < 1:
            raise ValueError(f"jsd beta must lie in (0, 1), got {self.beta}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"skew alpha must lie in [0, 1), got {self.alpha}")


def check_targets(targets: SparseTargets, n: int, vocab: int, config: KDConfig) -> None:
    """Shapes and ranges a kernel relies on (it reads ids as indices); ValueError naming what is wrong."""
    if targets.offsets.numel() != n + 1:
        raise ValueError(f"targets hold {targets.offsets.numel() - 1} positions, the logits {n}")
    if int(targets.offsets[0]) != 0 or int(targets.offsets[-1]) != targets.ids.numel():
        raise ValueError("target offsets must start at 0 and end at the number of ids")
    if targets.ids.numel() and (int(targets.ids.min()) < 0 or int(targets.ids.max()) >= vocab):
        raise ValueError(f"a target id lies outside the student's {vocab} logits")
    if config.loss == "sampled_ce" and targets.counts is None:
        raise ValueError("sampled_ce needs draw counts: use it with a cache of sampled targets")
    if config.loss != "sampled_ce" and config.tail == "rest" and targets.rest is None:
        raise ValueError("tail 'rest' needs the rest mass per position")


def default_weights(n: int, device) -> torch.Tensor:
    """1/N per position: the mean over positions."""
    return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64, device=device)
