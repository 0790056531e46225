"""What the sparse KD losses take: the teacher's targets of N positions (``SparseTargets``, CSR style), the
loss configuration (``KDConfig``) and the one check of every input at the boundary (``check_inputs``).

Shared by the loss kernels (student.losses), the chunked head (student.fused_head), the batch
(student.collate) and the options (student.options); docs/losses.md defines every loss and tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "sampled_ce")
TAILS = ("rest", "renormalize")
PROB_FLOOR = 1e-12
"""Teacher probabilities below this are raised to it inside reverse_kl's log (a p_b = 0 bucket)."""
IGNORE_INDEX = -100
"""``labels`` value where no next token is to be predicted (torch's cross_entropy ignore_index)."""
LOGPROB_TOLERANCE = 1e-4
"""Teacher log-probs may exceed 0 by this much (an importer's rounding); larger ones are refused."""

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
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if not 0 < self.beta < 1:
            raise ValueError(f"jsd beta must lie in (0, 1), got {self.beta}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"skew alpha must lie in [0, 1), got {self.alpha}")


# --------------------------------------------------------------------------------------------------------
# the boundary check: every input of a loss call, before any kernel reads it

CHECKS = {  # name -> (field, the rule); tried in this order, the first failure is reported
    "offsets": ("targets.offsets", "offsets must start at 0, never decrease and end at the number of ids"),
    "labels": ("labels", "labels must lie in [0, {vocab}) or be the ignore index " + str(IGNORE_INDEX)),
    "ids": ("targets.ids", "stored ids must lie in [0, {vocab}), the student's logits"),
    "duplicate": ("targets.ids", "the ids of one position must be distinct"),
    "logprobs": ("targets.logprobs", f"teacher log-probs must be <= 0 (up to {LOGPROB_TOLERANCE:g}), finite or -inf"),
    "rest": ("targets.rest", "the rest mass must lie in [0, 1]"),
    "counts": ("targets.counts", "draw counts must be finite and >= 0"),
}
_CHECK_NAMES = tuple(CHECKS)


@numba.njit(nogil=True, cache=True)
def _first_failure(offsets, ids, logprobs, rest, counts, labels, vocab, tolerance):
    """Sequential passes, one per check in CHECKS' order: (check index, position, entry index or -1) of the
    first failure, or (-1, -1, -1). Empty rest / counts / labels arrays are not checked."""
    n = offsets.shape[0] - 1
    if offsets[0] != 0:
        return 0, 0, -1
    for i in range(n):
        if offsets[i + 1] < offsets[i]:
            return 0, i, -1
    if offsets[n] != ids.shape[0]:
        return 0, n, -1
    for i in range(labels.shape[0]):
        if labels[i] != IGNORE_INDEX and (labels[i] < 0 or labels[i] >= vocab):
            return 1, i, -1
    for i in range(n):
        for e in range(offsets[i], offsets[i + 1]):
            if ids[e] < 0 or ids[e] >= vocab:
                return 2, i, e
    seen = np.full(vocab, -1, np.int64)        # seen[id]: the last position that stored the id
    for i in range(n):
        for e in range(offsets[i], offsets[i + 1]):
            if seen[ids[e]] == i:
                return 3, i, e
            seen[ids[e]] = i
    for i in range(n):
        for e in range(offsets[i], offsets[i + 1]):
            if not logprobs[e] <= tolerance:   # NaN and +inf fail too
                return 4, i, e
    for i in range(rest.shape[0]):
        if not (rest[i] >= 0.0 and rest[i] <= 1.0):
            return 5, i, -1
    if counts.shape[0]:
        for i in range(n):
            for e in range(offsets[i], offsets[i + 1]):
                if not (counts[e] >= 0.0 and counts[e] < math.inf):
                    return 6, i, e
    return -1, -1, -1


def _first_failure_torch(offsets, ids, logprobs, rest, counts, labels, vocab, tolerance):
    """``_first_failure`` in vectorised torch on the tensors' own device (CUDA), with the same answer;
    two host synchronisations."""
    n = offsets.numel() - 1
    if int(offsets[0]) != 0:
        return 0, 0, -1
    sizes = offsets[1:] - offsets[:-1]
    decreasing = torch.nonzero(sizes < 0)
    if decreasing.numel():
        return 0, int(decreasing[0, 0]), -1
    if int(offsets[-1]) != ids.numel():
        return 0, n, -1
    device = offsets.device
    none = torch.tensor(-1, device=device)

    def first(mask):                           # the first True index, -1 when none
        return torch.where(mask.any(), mask.to(torch.int8).argmax(), none) if mask.numel() else none

    pos = torch.repeat_interleave(torch.arange(n, device=device), sizes)
    key = pos * vocab + ids.long()
    order = torch.sort(key, stable=True).indices                  # equal keys keep their entry order
    repeats = key[order][1:] == key[order][:-1]
    later = torch.where(repeats, order[1:], ids.numel())          # the later entry of each equal pair
    found = torch.stack([
        first((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))),
        first((ids < 0) | (ids >= vocab)),
        torch.where(repeats.any(), later.min(), none) if repeats.numel() else none,
        first(~(logprobs <= tolerance)),
        first(~((rest >= 0) & (rest <= 1))),
        first(~((counts >= 0) & torch.isfinite(counts))),
    ]).tolist()
    for check, index in enumerate(found, start=1):
        if index >= 0:
            if _CHECK_NAMES[check] in ("labels", "rest"):   # per-position checks
                return check, index, -1
            return check, int(pos[index]), index
    return -1, -1, -1


def check_inputs(targets: SparseTargets, labels: torch.Tensor | None, n: int, vocab: int, config: KDConfig) -> None:
    """Refuse any input a loss kernel would misread, before it runs: ValueError naming the field, the first
    bad position and its value. Checks the shapes, the offsets, labels in [0, V) or the ignore index, ids
    in [0, V) and distinct within a position, teacher log-probs <= LOGPROB_TOLERANCE (finite or -inf),
    rest masses in [0, 1] and draw counts finite and >= 0. On CPU one numba pass (0.6 ms at N = 4096,
    k = 64: 0.3% of the kernel), on other devices a vectorised torch pass with the same answer."""
    if targets.offsets.numel() != n + 1:
        raise ValueError(f"targets.offsets: the targets hold {targets.offsets.numel() - 1} positions, the logits {n}; "
                         "pass one position of targets per row of logits")
    for name, t, size in (("targets.logprobs", targets.logprobs, targets.ids.numel()),
                          ("targets.counts", targets.counts, targets.ids.numel()),
                          ("targets.rest", targets.rest, n), ("labels", labels, n)):
        if t is not None and t.numel() != size:
            raise ValueError(f"{name}: {t.numel()} values where {size} are needed (one per "
                             f"{'position' if size == n else 'stored id'})")
    if config.loss == "sampled_ce" and targets.counts is None:
        raise ValueError("targets.counts: sampled_ce needs draw counts: use it with a cache of sampled targets")
    if config.loss != "sampled_ce" and config.tail == "rest" and targets.rest is None:
        raise ValueError("targets.rest: tail 'rest' needs the rest mass per position (or use tail 'renormalize')")
    arrays = (targets.offsets, targets.ids, targets.logprobs,
              targets.rest if targets.rest is not None else targets.logprobs.new_zeros(0),
              targets.counts if targets.counts is not None else targets.logprobs.new_zeros(0),
              labels if labels is not None else targets.ids.new_zeros(0))
    if targets.offsets.device.type == "cpu":
        check, position, entry = _first_failure(
            *(a.detach().contiguous().numpy() for a in arrays[:2]),
            *(a.detach().float().contiguous().numpy() for a in arrays[2:5]),
            arrays[5].detach().long().contiguous().numpy(), vocab, LOGPROB_TOLERANCE)
    else:
        check, position, entry = _first_failure_torch(*arrays, vocab, LOGPROB_TOLERANCE)
    if check >= 0:
        raise ValueError(failure_message(targets, labels, _CHECK_NAMES[check], position, entry, vocab))


def failure_message(targets: SparseTargets, labels, check: str, position: int, entry: int, vocab: int) -> str:
    """The refusal of one failed check: field, position, the value found and what a valid one is."""
    field, rule = CHECKS[check]
    if check == "offsets":
        offsets = targets.offsets
        found = (f"offset {int(offsets[position])}" if position == 0 or position == offsets.numel() - 1 else
                 f"offset {int(offsets[position])} then {int(offsets[position + 1])}")
        if position == offsets.numel() - 1:
            found += f" with {targets.ids.numel()} ids"
    elif check == "labels":
        found = f"label {int(labels[position])}"
    elif check == "rest":
        found = f"rest mass {float(targets.rest[position])!r}"
    else:
        slot = entry - int(targets.offsets[position])
        stored = f"entry {slot}, id {int(targets.ids[entry])}"
        found = {"ids": f"id {int(targets.ids[entry])} (entry {slot})",
                 "duplicate": f"id {int(targets.ids[entry])} twice (entry {slot} repeats it)",
                 "logprobs": f"log-prob {float(targets.logprobs[entry])!r} ({stored})",
                 "counts": f"draw count {float(targets.counts[entry])!r} ({stored})"}[check]
    return f"{field}: position {position} has {found}; {rule.format(vocab=vocab)}"


def default_weights(n: int, device) -> torch.Tensor:
    """1/N per position: the mean over positions."""
    return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64, device=device)


def rest_tempering(targets: SparseTargets, temperature: float, vocab: int) -> dict:
    """What tail ``rest`` does at T != 1, on these targets: the rest bucket is tempered as if it were one
    token, r^(1/T), where the teacher's full distribution gives sum over the unstored ids of p_v^(1/T).

    Returns the mean over positions with rest > 0 of the rest bucket's share of the tempered teacher mass
    as the loss takes it (``approx``) and the range the full distribution allows (``low``, ``high``): each
    unstored probability lies in [0, the smallest stored one] (true of top-k and nucleus sets) and they sum
    to r, so the tempered sum lies between r p_min^(1/T - 1) (the mass in as few ids as possible) and
    (V - k)^(1 - 1/T) r^(1/T) (spread evenly). For T > 1 the approximation lies below both, for T < 1 above.
    """
    sizes = targets.offsets[1:] - targets.offsets[:-1]
    n = sizes.numel()
    pos = torch.repeat_interleave(torch.arange(n, device=sizes.device), sizes)
    lp = targets.logprobs.double()
    inv_t = 1.0 / temperature
    stored = torch.zeros(n, dtype=torch.float64, device=sizes.device).index_add_(0, pos, (lp * inv_t).exp())
    p_min = torch.ones(n, dtype=torch.float64, device=sizes.device).scatter_reduce_(0, pos, lp.exp(), "amin")
    r = targets.rest.double()
    keep = (r > 0) & (sizes > 0)
    if not bool(keep.any()):
        return {"positions": 0, "approx": 0.0, "low": 0.0, "high": 0.0}
    r, stored, p_min, k = r[keep], stored[keep], p_min[keep], sizes[keep].double()
    approx = r ** inv_t
    concentrated = r * p_min.clamp_min(1e-300) ** (inv_t - 1.0)
    spread = (vocab - k).clamp_min(1.0) ** (1.0 - inv_t) * approx

    def share(x):
        return x / (stored + x)

    a, b = share(concentrated), share(spread)
    return {"positions": int(keep.sum()), "approx": float(share(approx).mean()),
            "low": float(torch.minimum(a, b).mean()), "high": float(torch.maximum(a, b).mean())}
