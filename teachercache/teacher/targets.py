"""What the teacher pass stores per target position, computed on the teacher's device.

For every target position of a batch (a token whose ``target_mask`` is set; it predicts the next token of
its row): the sparse target by kind (``topk``: the k most likely ids; ``nucleus``: the fewest ids whose
mass reaches top_p, clamped to [min_k, max_k]; ``sample``: N draws with replacement, stored as distinct
ids with counts, from a generator seeded by (seed, global row index) alone), the stored ids' log-probs,
the label's log-prob, the rest mass and the entropy, over the tokenizer's vocabulary at the cache
temperature (the model's padding columns are dropped). Only these compact results leave the device.

Top-k and nucleus have two implementations, checked against each other and a dense float64 computation:
plain torch (any device; what a GPU teacher uses) and, for a CPU teacher, one numba pass per row
(``_top_rows``) in place of torch's separate softmax, top-k and entropy passes. docs/build.md
("Targets") has the details: chunking, vocabulary padding, the numba pass, ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from teachercache.errors import OptionError, check_number
from teachercache.format.manifest import TargetSpec
from teachercache.format.schema import TARGET_KINDS
from teachercache.numerics import LAUNCH_LOCK, exp_row_and_dot


@dataclass
class TargetArrays:
    """Targets of P positions, CSR on the host (numpy), in the layout RowBatch uses."""

    target_offsets: np.ndarray   # (P+1,) int64
    target_ids: np.ndarray       # (E,) int32
    target_logprobs: np.ndarray  # (E,) float32
    target_counts: np.ndarray | None  # (E,) int32, sampled targets only
    label_logprob: np.ndarray    # (P,) float32
    rest_mass: np.ndarray        # (P,) float32
    entropy: np.ndarray          # (P,) float32


MAX_IDS = 65535
"""Most ids (or draws) per position a cache stores."""
TEMPERATURES = (1e-4, 1e4)
"""The temperatures a build takes: finite, and far enough from 0 that 1/T stays finite in float32."""


@dataclass(frozen=True)
class TargetOptions:
    """The target flags of a build: every kind's parameters with their defaults; ``spec()`` keeps the
    chosen kind's (the manifest's TargetSpec records only those)."""

    kind: str = "topk"
    """What to store per position: topk, nucleus or sample."""
    k: int = 64
    """topk: ids per position."""
    top_p: float = 0.95
    """nucleus: mass to reach."""
    min_k: int = 1
    """nucleus: fewest ids per position."""
    max_k: int = 128
    """nucleus: most ids per position."""
    samples: int = 64
    """sample: draws per position."""
    seed: int = 0
    """sample: seed of the draws."""
    temperature: float = 1.0
    """Teacher softmax temperature."""

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise OptionError(f"--target {self.kind!r}: choose one of {', '.join(TARGET_KINDS)}")
        for name in ("k", "min_k", "max_k", "samples"):
            check_number("build", f"{name} (--{name.replace('_', '-')})", getattr(self, name), low=1, high=MAX_IDS,
                         integer=True)
        check_number("build", "top_p (--top-p)", self.top_p, low=0, low_open=True, high=1)
        check_number("build", "seed (--seed)", self.seed, low=0, high=2**63 - 1, integer=True)
        check_number("build", "temperature (--temperature)", self.temperature, low=TEMPERATURES[0],
                     high=TEMPERATURES[1])

    def spec(self) -> TargetSpec:
        topk, nucleus, sample = self.kind == "topk", self.kind == "nucleus", self.kind == "sample"
        return TargetSpec(kind=self.kind, k=self.k if topk else None, top_p=self.top_p if nucleus else None,
                          min_k=self.min_k if nucleus else None, max_k=self.max_k if nucleus else None,
                          samples=self.samples if sample else None, seed=self.seed if sample else None,
                          temperature=self.temperature)


def check_spec(spec: TargetSpec, vocab_size: int | None) -> None:
    """Refuse (OptionError, a ValueError) a target spec that cannot work, with the option to fix: counts are
    integers in range (at most the vocabulary's size once it is known), top_p and the temperature finite."""
    high = MAX_IDS if vocab_size is None else min(vocab_size, MAX_IDS)

    def count(value, most: int = high) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    lo, hi = TEMPERATURES
    if not (number(spec.temperature) and lo <= spec.temperature <= hi):
        raise OptionError(f"--temperature must be a finite number in [{lo:g}, {hi:g}], got {spec.temperature}")
    if spec.kind == "topk" and not count(spec.k):
        raise OptionError(f"--k must be in [1, {high}], got {spec.k}")
    if spec.kind == "nucleus":
        if not (number(spec.top_p) and 0 < spec.top_p <= 1):
            raise OptionError(f"--top-p must be in (0, 1], got {spec.top_p}")
        if not (count(spec.min_k) and count(spec.max_k) and spec.min_k <= spec.max_k):
            raise OptionError(f"--min-k/--max-k must satisfy 1 <= min_k <= max_k <= {high}, got "
                              f"{spec.min_k}/{spec.max_k}")
    if spec.kind == "sample":
        if not count(spec.samples, MAX_IDS):  # draws with replacement: not bounded by the vocabulary
            raise OptionError(f"--samples must be in [1, {MAX_IDS}], got {spec.samples}")
        if not (isinstance(spec.seed, int) and not isinstance(spec.seed, bool)):
            raise OptionError(f"sampled targets need an integer --seed, got {spec.seed}")


def row_generator(seed: int, row_index: int, device: torch.device) -> torch.Generator:
    """The generator of one row's draws: seeded by (seed, global row index) only."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + row_index) % (2**63 - 1))
    return g


@torch.no_grad()
def compute_targets(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                    spec: TargetSpec, vocab_size: int, row_indices: list[int] | None = None,
                    chunk_positions: int = 4096, backend: str = "auto") -> TargetArrays:
    """Targets of every masked-in position of a batch of rows.

    logits: (B, T, V_out) teacher logits, any float dtype, V_out >= vocab_size;
    input_ids: (B, T) the rows; target_mask: (B, T) bool, position t predicts input_ids[t+1] (the last
    position of a row must be masked out); row_indices: the rows' global indices (seeds of sampling).
    backend: ``auto`` (numba for top-k and nucleus targets of CPU logits, torch otherwise), ``torch``, or
    ``numba`` (CPU logits only). The torch path works on views of the logits, a chunk of one row's
    positions at a time; nothing of size (positions x vocabulary) is copied but the probabilities of one
    chunk. The numba path makes one call per batch (float32 logits are not copied).
    """
    check_spec(spec, vocab_size)
    B, T, V_out = logits.shape
    if V_out < vocab_size:
        raise ValueError(f"the teacher has {V_out} output columns but the tokenizer {vocab_size} tokens")
    if target_mask[:, -1].any():
        raise ValueError("target_mask: the last position of a row has no next token to predict")
    if row_indices is None:
        row_indices = list(range(B))
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"unknown backend {backend!r}: auto, torch or numba")
    if backend == "numba" and (logits.device.type != "cpu" or spec.kind == "sample"):
        raise ValueError("the numba backend computes top-k and nucleus targets of CPU logits")
    if backend == "numba" or (backend == "auto" and logits.device.type == "cpu" and spec.kind != "sample"):
        return _targets_numba(logits, input_ids, target_mask, spec, vocab_size)
    parts = []
    for b in range(B):
        u_row = None  # the row's (T, N) uniforms, drawn once however many chunks the row has
        if spec.kind == "sample" and target_mask[b].any():
            u_row = torch.rand((T, spec.samples), generator=row_generator(spec.seed, row_indices[b], logits.device),
                               device=logits.device)
        for start in range(0, T - 1, chunk_positions):
            stop = min(start + chunk_positions, T - 1)
            keep = target_mask[b, start:stop]
            if not keep.any():
                continue
            x = logits[b, start:stop, :vocab_size].float()  # (n, V): a view for float32 logits
            if spec.temperature != 1.0:
                x = x / spec.temperature
            labels = input_ids[b, start + 1:stop + 1]
            u = None if u_row is None else u_row[start:stop][keep]
            parts.append(_chunk_targets(x, labels, keep, spec, u))
    return _concat(parts, spec)


@torch.no_grad()
def position_targets(logits: torch.Tensor, labels: torch.Tensor, spec: TargetSpec, vocab_size: int,
                     uniforms: torch.Tensor | None = None, backend: str = "auto") -> TargetArrays:
    """Targets of n positions from their logits alone: what the chunked teacher pass computes per chunk.

    logits: (n, V_out) teacher logits of n target positions, V_out >= vocab_size; labels: (n,) each
    position's actual next token; uniforms: (n, samples) the draws' uniforms of sampled targets
    (``position_uniforms``). Equal to ``compute_targets`` on the same positions (tested); backends as there.
    """
    check_spec(spec, vocab_size)
    n, V_out = logits.shape
    if V_out < vocab_size:
        raise ValueError(f"the teacher has {V_out} output columns but the tokenizer {vocab_size} tokens")
    if spec.kind == "sample" and (uniforms is None or uniforms.shape != (n, spec.samples)):
        raise ValueError(f"sampled targets need uniforms of shape ({n}, {spec.samples})")
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"unknown backend {backend!r}: auto, torch or numba")
    if backend == "numba" and (logits.device.type != "cpu" or spec.kind == "sample"):
        raise ValueError("the numba backend computes top-k and nucleus targets of CPU logits")
    if backend == "numba" or (backend == "auto" and logits.device.type == "cpu" and spec.kind != "sample"):
        x = logits.detach().to(torch.float32).contiguous().numpy()
        return _numba_targets(x, np.arange(n, dtype=np.int64), labels.cpu().numpy().astype(np.int64), spec,
                              vocab_size)
    if n == 0:
        return _concat([], spec)
    x = logits[:, :vocab_size].float()
    if spec.temperature != 1.0:
        x = x / spec.temperature
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    return _concat([_chunk_targets(x, labels.to(x.device), keep, spec, uniforms)], spec)


def position_uniforms(spec: TargetSpec, row_indices: list[int], rows: torch.Tensor, cols: torch.Tensor, length: int,
                      device) -> torch.Tensor:
    """(P, samples) uniforms of sampled targets at positions (rows, cols) of a batch whose rows are ``length``
    long: the values ``compute_targets`` draws for the same positions (each row's (length, samples) block
    from its own generator, row_generator)."""
    out = torch.empty((len(rows), spec.samples), device=device)
    for b in torch.unique(rows).tolist():
        at = (rows == b).nonzero(as_tuple=True)[0]
        u_row = torch.rand((length, spec.samples), generator=row_generator(spec.seed, row_indices[b], device),
                           device=device)
        out[at.to(device)] = u_row[cols[at].to(device)]
    return out


def join_targets(parts: list[TargetArrays], spec: TargetSpec) -> TargetArrays:
    """The targets of consecutive groups of positions as one TargetArrays."""
    if not parts:
        return _concat([], spec)
    sizes = np.concatenate([np.diff(p.target_offsets) for p in parts])
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return TargetArrays(target_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                        target_ids=cat("target_ids"), target_logprobs=cat("target_logprobs"),
                        target_counts=cat("target_counts") if spec.kind == "sample" else None,
                        label_logprob=cat("label_logprob"), rest_mass=cat("rest_mass"), entropy=cat("entropy"))


def _chunk_targets(x: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, spec: TargetSpec,
                   u: torch.Tensor | None) -> dict:
    """Targets of the kept positions of one chunk; x (n, V) float32 logits at the cache temperature."""
    if not bool(keep.all()):  # only the kept positions from here on
        x, labels = x[keep], labels[keep]
    p = torch.softmax(x, dim=1)  # (n, V), one fused pass
    if spec.kind == "sample":
        top_x, top_ids = x.max(dim=1, keepdim=True)
    else:
        max_k = spec.k if spec.kind == "topk" else spec.max_k
        top_x, top_ids = x.topk(max_k, dim=1)  # (n, max_k), sorted
    # log-sum-exp from the most likely column: lse = x_j - log p_j, exact to float32 rounding for the
    # largest p_j (>= 1/V); cheaper than a separate logsumexp pass
    lse = top_x[:, :1] - torch.log(p.gather(1, top_ids[:, :1]))  # (n, 1)
    label_lp = x.gather(1, labels[:, None])[:, 0] - lse[:, 0]
    entropy = (lse - top_x[:, :1])[:, 0] - _shifted_dot(p, x, top_x[:, :1])  # H = lse - sum p x, shifted by max
    if spec.kind == "sample":
        ids, counts = _sample(p, u)
        stored = counts > 0
        sizes = stored.sum(1)
        stored_lp = x.gather(1, ids) - lse
        rest = 1.0 - torch.where(stored, stored_lp.exp(), 0.0).sum(1)
        return dict(sizes=sizes, ids=ids[stored], lps=stored_lp[stored], counts=counts[stored], label=label_lp,
                    rest=rest, entropy=entropy)
    top_lp = top_x - lse
    if spec.kind == "topk":
        sizes = torch.full((len(x),), max_k, dtype=torch.long, device=x.device)
    else:  # nucleus: the smallest n with cumulative mass >= top_p, clamped
        mass = top_lp.exp().cumsum(1)
        sizes = ((mass < spec.top_p).sum(1) + 1).clamp(spec.min_k, spec.max_k)
    stored = torch.arange(max_k, device=x.device)[None, :] < sizes[:, None]
    rest = 1.0 - torch.where(stored, top_lp.exp(), 0.0).sum(1)
    return dict(sizes=sizes, ids=top_ids[stored], lps=top_lp[stored], counts=None, label=label_lp, rest=rest,
                entropy=entropy)


def _shifted_dot(p: torch.Tensor, x: torch.Tensor, m: torch.Tensor, block: int = 32768) -> torch.Tensor:
    """(n,) sum_v p[:, v] * (x[:, v] - m): the entropy's dot product over logits shifted by the row max, whose
    terms are small, so a float32 sum over 262,144 ids stays within ~1e-5 nats (lse - sum p x unshifted
    loses ~1e-3 to cancellation at V = 152k). Column blocks of ``block`` bound the shifted copy's memory."""
    out = torch.zeros(len(x), dtype=torch.float32, device=x.device)
    for a in range(0, x.shape[1], block):
        out += torch.bmm(p[:, None, a:a + block], (x[:, a:a + block] - m)[:, :, None])[:, 0, 0]
    return out


def _targets_numba(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor, spec: TargetSpec,
                   vocab_size: int) -> TargetArrays:
    """compute_targets for top-k and nucleus targets of CPU logits: one numba call for the whole batch
    (no torch work between parallel calls, whose idle OpenMP threads would spin against numba's)."""
    B, T, V_out = logits.shape
    x = logits.detach().to(torch.float32).contiguous().reshape(B * T, V_out).numpy()
    positions = np.flatnonzero(target_mask.reshape(-1).cpu().numpy())   # b * T + t, in row order
    labels = np.ascontiguousarray(input_ids.reshape(-1).cpu().numpy()[positions + 1], np.int64)
    return _numba_targets(x, positions.astype(np.int64), labels, spec, vocab_size)


def _numba_targets(x: np.ndarray, positions: np.ndarray, labels: np.ndarray, spec: TargetSpec,
                   vocab_size: int) -> TargetArrays:
    """Top-k or nucleus targets of rows ``positions`` of the float32 logits ``x`` (rows, V_out), whose next
    tokens are ``labels``: one numba-parallel call."""
    if len(labels) and (labels.min() < 0 or labels.max() >= vocab_size):
        raise ValueError(f"input_ids: a next token lies outside the tokenizer's {vocab_size} ids")
    max_k = spec.k if spec.kind == "topk" else spec.max_k
    top_p, min_k = (spec.top_p, spec.min_k) if spec.kind == "nucleus" else (2.0, max_k)  # top-k: always max_k
    n = len(positions)
    top_ids = np.empty((n, max_k), np.int32)
    top_lp = np.empty((n, max_k), np.float32)
    sizes = np.empty(n, np.int64)
    label_lp, rest, entropy = (np.empty(n, np.float32) for _ in range(3))
    with LAUNCH_LOCK:
        _top_rows(x, vocab_size, np.float32(1.0 / spec.temperature), positions, labels,
                  float(top_p), min_k, top_ids, top_lp, sizes, label_lp, rest, entropy)
    stored = np.arange(max_k)[None, :] < sizes[:, None]
    return TargetArrays(target_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                        target_ids=top_ids[stored], target_logprobs=top_lp[stored], target_counts=None,
                        label_logprob=label_lp, rest_mass=np.maximum(rest, 0.0), entropy=entropy)


_BLOCK = 16
"""Top-k selection works on blocks of this many logits (see _top_k)."""


@numba.njit(nogil=True, cache=True, fastmath={"nnan", "ninf", "nsz"})
def _block_maxima(row, out):
    """out[b] = max(row[16 b : 16 b + 16]), vectorised (a NaN may be skipped here: the exponentials still
    carry it, and _top_k falls back to a full sort when the blocks do not add up)."""
    n = row.shape[0]
    full = n // _BLOCK
    for b in range(full):
        a = b * _BLOCK
        m = row[a]
        for v in range(a + 1, a + _BLOCK):
            m = max(m, row[v])
        out[b] = m
    if full < out.shape[0]:
        m = row[full * _BLOCK]
        for v in range(full * _BLOCK + 1, n):
            m = max(m, row[v])
        out[full] = m


@numba.njit(nogil=True, cache=True, inline="always")
def _rank_key(bits, v):
    """An int64 that orders entries as the top-k wants: by the float32 value whose bits are bits[v], then
    the smaller id first. (A negative float's low 31 bits are flipped so that signed order is float
    order; without a branch, as half the logits are negative and which half is unpredictable.)"""
    b = np.int64(bits[v])
    b ^= (b >> 63) & 0x7FFFFFFF
    return (b << 32) + (0xFFFFFFFF - v)


_BINS = 256
"""Histogram bins of the block maxima that bound the k-th largest entry (see _kth_bound)."""


@numba.njit(nogil=True, cache=True)
def _kth_bound(maxima, k):
    """A value t such that at least k block maxima are >= t, and usually only a few more: the maxima
    counted in _BINS equal bins from the largest down to the smallest finite one, summed from the top
    until k are counted; t is the lower edge of that bin. (A quickselect of the maxima gives the exact
    k-th largest but mispredicts a branch on most of its steps: three times slower.)"""
    hi = maxima.max()
    lo = hi
    for x in maxima:
        lo = min(lo, x if x > -np.inf else hi)
    if not hi > lo:  # all maxima equal, or NaN / infinite logits: every entry is a candidate
        return -np.inf
    scale = (_BINS - 1) / (np.float64(hi) - lo)
    counts = np.zeros(_BINS, np.int64)
    for x in maxima:
        d = (hi - np.float64(x)) * scale
        d = d if d < _BINS - 1 else _BINS - 1.0   # also -inf and NaN maxima: the last bin
        counts[np.int64(d)] += 1
    total = 0
    for j in range(_BINS):
        total += counts[j]
        if total >= k:
            return hi - (j + 1.001) / scale  # a hair below the bin's edge, for rounding
    return -np.inf


@numba.njit(nogil=True, cache=True)
def _top_k(row, maxima, out):
    """The k = len(out) best entries of a float32 row as rank keys, best first (id = 0xFFFFFFFF - key's
    low half). A bound t below which at least k block maxima lie is a lower bound of the k-th largest
    entry (k blocks have an entry >= t), so only entries >= t, in blocks whose maximum is >= t, can be
    among the best k: typically under twice k of them, gathered without branches, then sorted."""
    k = out.shape[0]
    n = row.shape[0]
    bits = row.view(np.int32)
    nb = maxima.shape[0]
    c = 0
    keys = np.empty(0, np.int64)
    if nb >= k:
        t = _kth_bound(maxima, k)
        live = np.empty(nb, np.int64)
        n_live = 0
        for b in range(nb):
            live[n_live] = b
            n_live += maxima[b] >= t
        keys = np.empty(n_live * _BLOCK, np.int64)
        for i in range(n_live):
            b = live[i]
            for v in range(b * _BLOCK, min((b + 1) * _BLOCK, n)):
                keys[c] = _rank_key(bits, v)
                c += row[v] >= t
    if c < k:   # a short row (fewer blocks than k), or NaN / infinite logits: sort the whole row
        keys = np.empty(n, np.int64)
        for v in range(n):
            keys[v] = _rank_key(bits, v)
        c = n
    keys = np.sort(keys[:c])
    for j in range(k):
        out[j] = keys[c - 1 - j]


@numba.njit(nogil=True, parallel=True, cache=True)
def _top_rows(x, vocab, inv_t, positions, labels, top_p, min_k, top_ids, top_lp, sizes, label_lp, rest, entropy):
    """For each target position (a row of x (rows, V_out) float32 logits; columns from ``vocab`` on are
    padding), at temperature 1 / inv_t: the max_k = top_ids.shape[1] most likely ids best first with
    their log-probs, how many to store (nucleus: the smallest n whose mass reaches top_p, clamped to
    [min_k, max_k]; top_p > 1 stores max_k), the label's log-prob, the rest mass and the entropy."""
    k = top_ids.shape[1]
    for i in numba.prange(len(positions)):
        row = x[positions[i]][:vocab]
        maxima = np.empty((vocab + _BLOCK - 1) // _BLOCK, np.float32)
        _block_maxima(row, maxima)
        m = maxima.max()
        e = np.empty(vocab, np.float32)
        s, dot = exp_row_and_dot(row, m, inv_t, e)   # e_v = exp((x_v - m) / T), dot = sum_v e_v (x_v - m)
        log_s = math.log(s)
        entropy[i] = log_s - inv_t * dot / s     # H = lse - sum p x, at 1/T
        label_lp[i] = (row[labels[i]] - m) * inv_t - log_s
        keys = np.empty(k, np.int64)
        _top_k(row, maxima, keys)
        mass = 0.0   # of the stored entries, from their float32 log-probs as stored
        size = k
        for j in range(k):
            v = 0xFFFFFFFF - (keys[j] & 0xFFFFFFFF)
            top_ids[i, j] = v
            top_lp[i, j] = (row[v] - m) * inv_t - log_s
            if j < size:
                mass += math.exp(np.float64(top_lp[i, j]))
                if j + 1 >= min_k and mass >= top_p:
                    size = j + 1
        sizes[i] = size
        rest[i] = 1.0 - mass


def _sample(p: torch.Tensor, u: torch.Tensor):
    """Draws by inverse CDF; returns (ids (n, N) sorted, counts (n, N)) where counts[i, j] is the number of
    draws of ids[i, j] at its first occurrence in the sorted draws and 0 elsewhere."""
    N = u.shape[1]
    cdf = p.cumsum(1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end, so no draw falls off it
    draws = torch.searchsorted(cdf, u, right=True).clamp_max(p.shape[1] - 1)
    draws = draws.sort(1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    # the count of a run = distance from its first element to the next run's first element
    idx = torch.arange(N, device=p.device).expand_as(draws)
    starts = torch.where(first, idx, torch.full_like(idx, N))
    next_start = torch.flip(torch.cummin(torch.flip(torch.cat(
        [starts[:, 1:], torch.full_like(starts[:, :1], N)], 1), [1]), 1).values, [1])
    counts = torch.where(first, next_start - idx, torch.zeros_like(idx))
    return draws, counts


def _concat(parts: list[dict], spec: TargetSpec) -> TargetArrays:
    cat = lambda key, dtype: (torch.cat([d[key] for d in parts]).cpu().numpy().astype(dtype)  # noqa: E731
                              if parts else np.zeros(0, dtype))
    sizes = cat("sizes", np.int64)
    return TargetArrays(
        target_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        target_ids=cat("ids", np.int32), target_logprobs=cat("lps", np.float32),
        target_counts=cat("counts", np.int32) if spec.kind == "sample" else None,
        label_logprob=cat("label", np.float32), rest_mass=np.maximum(cat("rest", np.float32), 0.0),
        entropy=cat("entropy", np.float32))
