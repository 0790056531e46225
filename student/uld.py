"""Universal logit distillation (ULD) over a sparse teacher: for teacher and student with different tokenizers.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"
(arXiv:2402.12030): the two next-token distributions live on different vocabularies, so ULD compares them
without matching ids. Each probability vector is sorted in decreasing order (the shorter one padded with
zeros) and the loss is their L1 distance, sum_i |p_(i) - q_(i)|: the closed form of the Wasserstein-1
distance between the two distributions under a cost that is 1 between any two distinct tokens, once each
is laid out in its own rank order. It says how peaked the student should be, not on which token, so the
paper always adds the cross-entropy on the student's own labels (as ``--cross-tokenizer uld`` requires).

A cache keeps k stored probabilities per position and the rest mass r, not the teacher's whole vector.
The stored ids of a top-k (or nucleus) target are the teacher's k most likely, so its sorted vector starts
with the stored probabilities, sorted, and r is spread over ranks k+1.. in a way the cache does not say.
Here the rest is compared as one bucket with the student's mass beyond its own k largest:

    ULD_sparse = sum_{i<=k} |p_(i) - q_(i)|  +  |r - sum_{i>k} q_(i)|

This is a lower bound of the full ULD (the triangle inequality over ranks k+1..), equal to it when the
teacher's tail and the student's tail differ with one sign at every rank, and exactly the paper's loss
when the teacher's whole distribution is stored (r = 0 and k = the teacher's vocabulary, zero-padded).
Spreading r evenly instead would teach the student a flat tail, and dropping it would let the student
leak any mass into its tail unpunished. Temperature: q = softmax(z / T) and the teacher's buckets
re-tempered in log space, as the sparse KD losses do (docs/losses.md).

``uld_loss`` is the batched torch loss (autograd, any device); ``uld_reference`` the same formula one
position at a time in plain Python; ``uld_dense`` the paper's loss on two full distributions.
"""

from __future__ import annotations

import math

import torch

from teachercache.student.kd_types import SparseTargets


def teacher_buckets(targets: SparseTargets, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored probabilities [N, K] float64 sorted in decreasing order, 0 past each position's k; rest [N];
    k [N]): the teacher's buckets re-tempered by 1/T and normalised (a position with no mass: all 0)."""
    n = targets.num_positions
    sizes = targets.offsets[1:] - targets.offsets[:-1]
    k_max = int(sizes.max()) if n else 0
    device = targets.logprobs.device
    pos = torch.repeat_interleave(torch.arange(n, device=device), sizes)
    slot = torch.arange(targets.ids.numel(), device=device) - targets.offsets[:-1][pos]
    lp = torch.full((n, k_max + 1), -math.inf, dtype=torch.float64, device=device)
    lp[pos, slot] = targets.logprobs.double()
    rest = targets.rest.double() if targets.rest is not None else torch.zeros(n, dtype=torch.float64, device=device)
    lp[:, k_max] = torch.where(rest > 0, rest.clamp_min(1e-300).log(), -math.inf)
    lp = lp / temperature
    mass = lp.logsumexp(-1, keepdim=True)
    live = torch.isfinite(mass)
    p = torch.where(live, (lp - torch.where(live, mass, 0.0)).exp(), 0.0)
    stored = p[:, :k_max].sort(-1, descending=True).values
    return stored, p[:, k_max], sizes


def uld_loss(logits: torch.Tensor, targets: SparseTargets, temperature: float = 1.0) -> torch.Tensor:
    """ULD_sparse (module docstring) per position: logits [N, V] of the student (any vocabulary), the
    teacher's sparse targets of the same N positions (their ids are not used). Returns [N] float64."""
    n, vocab = logits.shape
    stored, rest, sizes = teacher_buckets(targets, temperature)
    k_max = stored.shape[1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    q = torch.softmax(logits.to(dtype) / temperature, -1)               # [N, V]
    top = q.topk(min(k_max, vocab), -1).values.double()                 # [N, K'] sorted, decreasing
    if top.shape[1] < k_max:   # more stored ids than the student has: its missing ranks hold 0
        top = torch.cat([top, top.new_zeros(n, k_max - top.shape[1])], 1)
    within = torch.arange(k_max, device=logits.device)[None, :] < sizes[:, None]   # [N, K] rank i <= k
    top = torch.where(within, top, 0.0)
    tail = (1.0 - top.sum(-1)).clamp_min(0.0)                          # the student's mass past its k largest
    return (stored - top).abs().sum(-1) + (rest - tail).abs()


def uld_reference(logits: torch.Tensor, targets: SparseTargets, temperature: float = 1.0) -> list[float]:
    """``uld_loss`` one position at a time in plain Python over sorted lists (the tests compare them)."""
    out = []
    for i in range(targets.num_positions):
        a, b = int(targets.offsets[i]), int(targets.offsets[i + 1])
        logs = [float(x) / temperature for x in targets.logprobs[a:b]]
        rest = float(targets.rest[i]) if targets.rest is not None else 0.0
        logs.append(math.log(rest) / temperature if rest > 0 else -math.inf)
        top_log = max(logs)
        if top_log == -math.inf:
            p, r = [], 0.0
        else:
            weights = [math.exp(x - top_log) for x in logs]
            p = sorted((w / sum(weights) for w in weights[:-1]), reverse=True)
            r = weights[-1] / sum(weights)
        z = [float(x) / temperature for x in logits[i]]
        m = max(z)
        e = [math.exp(x - m) for x in z]
        q = sorted((x / sum(e) for x in e), reverse=True)
        q = (q + [0.0] * len(p))[:len(p)] if len(p) > len(q) else q
        head = q[:len(p)]
        out.append(sum(abs(x - y) for x, y in zip(p, head)) + abs(r - max(0.0, 1.0 - sum(head))))
    return out


def uld_dense(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The paper's ULD between two full distributions [N, V_p] and [N, V_q]: both zero-padded to the larger
    vocabulary, sorted in decreasing order, L1 distance. Returns [N]."""
    size = max(p.shape[1], q.shape[1])
    p = torch.nn.functional.pad(p, (0, size - p.shape[1])).sort(-1, descending=True).values
    q = torch.nn.functional.pad(q, (0, size - q.shape[1])).sort(-1, descending=True).values
    return (p - q).abs().sum(-1)
