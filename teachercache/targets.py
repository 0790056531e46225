"""What the teacher pass stores per target position, computed on the teacher's device.

Given the teacher's logits for a batch of rows, compute for every target position (a token whose
``target_mask`` is set; it predicts the next token of the same row):

* the sparse target, by kind (DESIGN.md §3):
  - ``topk``: the k most likely ids;
  - ``nucleus``: the smallest set of most likely ids whose mass reaches top_p, clamped to [min_k, max_k];
  - ``sample``: N ids drawn with replacement from the teacher distribution; the distinct ids are stored
    with their draw counts (c_i / N is an unbiased estimate of p_i). Draws come from a generator seeded
    by (seed, global row index) alone, so they do not depend on how rows were batched or split over ranks;
* the log-probs of the stored ids, the log-prob of the actual next token (stored or not), the mass
  outside the stored ids (rest) and the entropy, all over the tokenizer's full vocabulary at the cache
  temperature.

Vocabulary padding: models often have more output columns than their tokenizer has tokens (e.g. 152064
vs 151936). Columns from ``vocab_size`` on are dropped before the softmax: they are never stored, and
the distribution is the teacher's over real tokens (padding columns carry essentially no mass).

Only compact results leave the device: at most max_k (or N) entries per position. Positions are
processed in chunks, so no more than ``chunk_positions`` x vocab floats exist at once beyond the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .manifest import TargetSpec


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


def check_spec(spec: TargetSpec, vocab_size: int) -> None:
    """Refuse a target spec that cannot work, with the option to fix."""
    if spec.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {spec.temperature}")
    if spec.kind == "topk" and not (spec.k and 1 <= spec.k <= min(vocab_size, 65535)):
        raise ValueError(f"--k must be in [1, {min(vocab_size, 65535)}], got {spec.k}")
    if spec.kind == "nucleus":
        if spec.top_p is None or not 0 < spec.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {spec.top_p}")
        if not (spec.min_k and spec.max_k and 1 <= spec.min_k <= spec.max_k <= min(vocab_size, 65535)):
            raise ValueError(f"--min-k/--max-k must satisfy 1 <= min_k <= max_k <= "
                             f"{min(vocab_size, 65535)}, got {spec.min_k}/{spec.max_k}")
    if spec.kind == "sample":
        if not (spec.samples and 1 <= spec.samples <= 65535):
            raise ValueError(f"--samples must be in [1, 65535], got {spec.samples}")
        if spec.seed is None:
            raise ValueError("sampled targets need --seed")


def row_generator(seed: int, row_index: int, device: torch.device) -> torch.Generator:
    """The generator of one row's draws: seeded by (seed, global row index) only."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + row_index) % (2**63 - 1))
    return g


@torch.no_grad()
def compute_targets(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                    spec: TargetSpec, vocab_size: int, row_indices: list[int] | None = None,
                    chunk_positions: int = 4096) -> TargetArrays:
    """Targets of every masked-in position of a batch of rows.

    logits: (B, T, V_out) teacher logits, any float dtype, V_out >= vocab_size;
    input_ids: (B, T) the rows; target_mask: (B, T) bool, position t predicts input_ids[t+1] (the last
    position of a row must be masked out); row_indices: the rows' global indices (seeds of sampling).
    Works on views of the logits, a chunk of one row's positions at a time; nothing of size (positions x
    vocabulary) is copied but the probabilities of one chunk.
    """
    check_spec(spec, vocab_size)
    B, T, V_out = logits.shape
    if V_out < vocab_size:
        raise ValueError(f"the teacher has {V_out} output columns but the tokenizer {vocab_size} tokens")
    if target_mask[:, -1].any():
        raise ValueError("target_mask: the last position of a row has no next token to predict")
    if row_indices is None:
        row_indices = list(range(B))
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
    entropy = lse[:, 0] - torch.bmm(p[:, None, :], x[:, :, None])[:, 0, 0]  # H = lse - sum p x
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
