"""Sparse knowledge-distillation losses: one fused numba kernel on CPU, a torch reference beside it.

Every loss here compares, per target position, the teacher's stored sparse distribution with the
student's distribution q = softmax(z / T) over its FULL vocabulary (z: the student's logits).

Buckets. A position stores ids S with teacher log-probs log p_j (over the teacher's full vocabulary at
the cache temperature) and the rest mass r = 1 - sum_S p_j. Losses other than ``sampled_ce`` compare two
distributions over buckets, chosen by the tail policy:

* ``rest`` (default): k+1 buckets, the stored ids plus one bucket for everything else. Teacher
  (p_j, r) / (sum_S p_j + r); student (q_j, q_rest) with q_rest = sum over ids outside S of q_v (summed
  exactly, not as 1 - sum_S q_j). Megatron's "ghost token", TRL's tail term.
* ``renormalize``: the same k+1 buckets, but the teacher's stored probabilities are renormalised to 1,
  p_j / sum_S p, and its rest bucket is empty; the student keeps its full-vocabulary (q_j, q_rest).
  For forward KL this is sum_S p_j/sum_S p * (log(p_j/sum_S p) - log q_j): Axolotl's KD loss and
  DistillKit's "zero" policy. It pushes the student's mass onto the stored ids (nothing outside S is
  learnt). A position whose stored teacher mass is 0 contributes nothing.

Losses over the buckets b (p: teacher, q: student):

==================  =======================================================================
forward_kl          sum_b p_b (log p_b - log q_b)
reverse_kl          sum_b q_b (log q_b - log max(p_b, PROB_FLOOR))   (the floor keeps p_b = 0 finite)
jsd (beta)          beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD's form)
tvd                 1/2 sum_b |p_b - q_b|
skew_kl (alpha)     KL(p || alpha p + (1 - alpha) q)          (DistiLLM, alpha = 0.1)
skew_reverse_kl     KL(q || (1 - alpha) p + alpha q)          (DistiLLM, alpha = 0.1)
sampled_ce          -sum_S (c_j / sum c) log q_j   over the full-vocabulary q; no tail term
==================  =======================================================================

Reverse KL, JSD, TVD and the skew losses are exact over the bucket distributions, which approximate the
full-vocabulary ones (the teacher's split of the rest mass is unknown): documented approximations.

Temperature. The student side is exact: q = softmax(z / T). The teacher side is re-tempered on the
buckets, p_b ∝ p_b^(1/T): exact for the ratios between stored ids, approximate for the rest bucket
(which holds many ids). ``sampled_ce`` keeps its draw weights c_j / sum c whatever T is. The KD term is
scaled by T² (Hinton et al.) so its gradients keep their size as T changes.

Combined loss per position i with weight w_i (1 / positions by default; 0 masks a position out):

    total = sum_i w_i (ce_weight * CE_i + kd_weight * T² * KD_i),   CE_i = -log softmax(z_i)[label_i]

CE uses the untempered logits; it shares the kernel's pass over the row, so CE + KD cost one pass.
Positions with label -100 have CE 0.

The numba kernel computes losses and the gradient w.r.t. the logits in one pass per row (three sweeps
over the row: max, exponentials, gradient), parallel over rows. For float32 logits the exponentials
use a polynomial exp that LLVM vectorises (``fastexp.exp_row``; numba's ``math.exp`` is one libm call per
element, which made the sweep the kernel's bottleneck); float64 logits keep libm's exp. Its gradient
is kept from the forward call and scaled in backward (as fused cross-entropy kernels do), so no [N, V]
log-softmax tensor is ever made. ``sparse_kd_reference`` is the same maths in plain torch with autograd: it serves CUDA
tensors, and the tests and the benchmark compare the kernel with it.

Numba threading layer: set to ``workqueue`` here (unless NUMBA_THREADING_LAYER says otherwise) before
any parallel kernel is compiled. It ships with every numba wheel and is fork-safe, so DataLoader workers
forked after the kernel ran keep working; GNU OpenMP (``omp``, numba's usual pick on Linux) is not
fork-safe. Workqueue is not safe for concurrent launches from several threads, so launches take a lock.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch

from .fastexp import exp_row

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "sampled_ce")
TAILS = ("rest", "renormalize")
PROB_FLOOR = 1e-12
"""Teacher probabilities below this are raised to it inside reverse_kl's log (a p_b = 0 bucket)."""

_LOSS_CODE = {name: i for i, name in enumerate(LOSSES)}
LAUNCH_LOCK = threading.Lock()
"""Held while a numba-parallel kernel runs (workqueue does not take concurrent launches); targets.py too."""


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


# --------------------------------------------------------------------------------------------------------
# numba kernel


@numba.njit(nogil=True, cache=True)
def _bucket_loss(code, p, q, beta, alpha, a):
    """Loss between bucket distributions p and q; a[b] = q_b * dLoss/dq_b."""
    loss = 0.0
    for b in range(p.shape[0]):
        pb, qb = p[b], q[b]
        if code == 0:  # forward KL
            if pb > 0.0:
                loss += pb * (math.log(pb) - math.log(qb))
            a[b] = -pb
        elif code == 1:  # reverse KL
            lp = math.log(max(pb, 1e-12))
            if qb > 0.0:
                lq = math.log(qb)
                loss += qb * (lq - lp)
                a[b] = qb * (lq - lp + 1.0)
            else:
                a[b] = 0.0
        elif code == 2:  # generalised JSD
            m = beta * pb + (1.0 - beta) * qb
            if pb > 0.0:
                loss += beta * pb * math.log(pb / m)
            if qb > 0.0:
                lqm = math.log(qb / m)
                loss += (1.0 - beta) * qb * lqm
                a[b] = (1.0 - beta) * qb * lqm
            else:
                a[b] = 0.0
        elif code == 3:  # total variation
            d = qb - pb
            loss += 0.5 * abs(d)
            a[b] = 0.5 * qb * (1.0 if d > 0 else (-1.0 if d < 0 else 0.0))
        elif code == 4:  # skew forward KL
            m = alpha * pb + (1.0 - alpha) * qb
            if pb > 0.0:
                loss += pb * math.log(pb / m)
                a[b] = -(1.0 - alpha) * qb * pb / m
            else:
                a[b] = 0.0
        else:  # skew reverse KL
            m = (1.0 - alpha) * pb + alpha * qb
            if qb > 0.0:
                lqm = math.log(qb / m)
                loss += qb * lqm
                a[b] = qb * (lqm + 1.0 - alpha * qb / m)
            else:
                a[b] = 0.0
    return loss


@numba.njit(nogil=True, parallel=True, cache=True)
def _fused_rows(z, offsets, ids, logprobs, counts, rest, labels, weights, code, renorm, temperature, beta,
                alpha, ce_w, kd_w, grad, ce_out, kd_out, exact):
    n, vocab = z.shape
    inv_t = 1.0 / temperature
    inv_t_row = z.dtype.type(inv_t)   # the exponentials in the logits' precision
    tempered = temperature != 1.0
    for i in numba.prange(n):
        g = grad[i]
        w = weights[i]
        ce_out[i] = 0.0
        kd_out[i] = 0.0
        if w == 0.0:
            g[:] = 0.0
            continue
        row = z[i]
        m = row[0]
        for v in range(1, vocab):
            if row[v] > m:
                m = row[v]
        # exponentials of the tempered row kept in the gradient buffer; sums in float64. Float32 rows
        # take the vectorised exp, float64 rows (exact=True: gradcheck, the float64 tests) libm's.
        label = labels[i]
        sum_t = 0.0
        sum_1 = 0.0
        if exact:
            for v in range(vocab):
                e = math.exp((row[v] - m) * inv_t_row)
                g[v] = e
                sum_t += e
        else:
            sum_t = exp_row(row, m, inv_t_row, g)
        if tempered and label >= 0:
            for v in range(vocab):
                sum_1 += math.exp(row[v] - m)
        else:
            sum_1 = sum_t
        if label >= 0:
            ce_out[i] = m + math.log(sum_1) - row[label]

        start, stop = offsets[i], offsets[i + 1]
        k = stop - start
        a = np.zeros(k + 1)
        q_s = np.zeros(k + 1)
        c_out = 0.0          # KD gradient factor for ids outside S: grad_v = coef * e_v * c_out
        gbar = 0.0
        coef = w * kd_w * temperature
        if kd_w != 0.0 and (k > 0 or (code != 6 and not renorm)):
            sum_s = 0.0
            for j in range(k):
                sum_s += g[ids[start + j]]
            if code == 6:  # sampled cross-entropy over the full-vocabulary q
                total_c = 0.0
                for j in range(k):
                    total_c += counts[start + j]
                loss = 0.0
                lse_t = m * inv_t + math.log(sum_t)
                for j in range(k):
                    wj = counts[start + j] / total_c
                    q_s[j] = g[ids[start + j]] / sum_t
                    if wj > 0.0:  # log q_j from the logit itself: exact even where exp underflows
                        loss -= wj * (row[ids[start + j]] * inv_t - lse_t)
                    a[j] = -wj
                    gbar += a[j]
                kd_out[i] = loss
                c_out = -gbar / sum_t
            else:
                p = np.zeros(k + 1)
                q = np.zeros(k + 1)
                for j in range(k):
                    p[j] = math.exp(np.float64(logprobs[start + j]))  # float64 exp, not float32
                    q[j] = g[ids[start + j]]
                # renormalize: the teacher's rest bucket is empty, so its stored mass is renormalised to 1
                p[k] = 0.0 if renorm else max(rest[i], 0.0)
                rest_sum = sum_t - sum_s
                if rest_sum < 1e-4 * sum_t:  # cancellation: sum the ids outside S directly
                    for j in range(k):
                        g[ids[start + j]] = -g[ids[start + j]]
                    rest_sum = 0.0
                    for v in range(vocab):
                        if g[v] > 0.0:
                            rest_sum += g[v]
                    for j in range(k):
                        g[ids[start + j]] = -g[ids[start + j]]
                q[k] = rest_sum
                # teacher buckets: normalise (re-tempered when T != 1); skip a position with no mass
                denom_p = 0.0
                for b in range(k + 1):
                    if tempered and p[b] > 0.0:
                        p[b] = p[b] ** inv_t
                    denom_p += p[b]
                if denom_p > 0.0 and sum_t > 0.0:
                    for b in range(k + 1):
                        p[b] /= denom_p
                        q[b] /= sum_t
                    kd_out[i] = _bucket_loss(code, p, q, beta, alpha, a)
                    for b in range(k + 1):
                        gbar += a[b]
                    for j in range(k):
                        q_s[j] = q[j]
                    c_out = (a[k] / rest_sum if rest_sum > 0.0 else 0.0) - gbar / sum_t
                else:
                    coef = 0.0
        # corrections at the stored ids, taken before the final sweep overwrites the exponentials
        corr = np.zeros(k + 1)
        for j in range(k):
            corr[j] = coef * (a[j] - q_s[j] * gbar - g[ids[start + j]] * c_out)
        kd_scale = coef * c_out
        ce_scale = w * ce_w if label >= 0 else 0.0
        if ce_scale != 0.0 and tempered:
            inv_s1 = 1.0 / sum_1
            for v in range(vocab):
                g[v] = kd_scale * g[v] + ce_scale * math.exp(row[v] - m) * inv_s1
        elif ce_scale != 0.0:
            s = kd_scale + ce_scale / sum_t
            for v in range(vocab):
                g[v] = s * g[v]
        else:
            for v in range(vocab):
                g[v] = kd_scale * g[v]
        for j in range(k):
            g[ids[start + j]] += corr[j]
        if ce_scale != 0.0:
            g[label] -= ce_scale


_TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64, np.int64: torch.int64}


def _numpy(t: torch.Tensor | None, dtype) -> np.ndarray:
    """``t`` as a contiguous CPU array of ``dtype`` for the kernel (an empty array for None)."""
    if t is None:
        return np.zeros(0, dtype=dtype)
    return t.detach().to("cpu", _TORCH_DTYPES[dtype]).contiguous().numpy()


def fused_sparse_kd(logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor | None,
                    weights: torch.Tensor, config: KDConfig):
    """Numba kernel call (CPU): returns (ce (N,), kd (N,), grad (N, V)) with no autograd.

    Float64 logits are computed in float64 (for gradcheck); anything else in float32.
    """
    z = logits.detach()
    z = z.contiguous() if z.dtype == torch.float64 else z.to(torch.float32).contiguous()
    n, vocab = z.shape
    grad = torch.empty_like(z)
    ce = np.zeros(n)
    kd = np.zeros(n)
    lab = _numpy(labels, np.int64) if labels is not None else np.full(n, -100, np.int64)
    with LAUNCH_LOCK:
        _fused_rows(z.numpy(), _numpy(targets.offsets, np.int64), _numpy(targets.ids, np.int64),
                    _numpy(targets.logprobs, np.float32), _numpy(targets.counts, np.float32),
                    _numpy(targets.rest, np.float32), lab, _numpy(weights, np.float64),
                    _LOSS_CODE[config.loss], config.tail == "renormalize", float(config.temperature),
                    float(config.beta), float(config.alpha), float(config.ce_weight), float(config.kd_weight),
                    grad.numpy(), ce, kd, z.dtype == torch.float64)
    return torch.from_numpy(ce), torch.from_numpy(kd), grad


# --------------------------------------------------------------------------------------------------------
# torch reference (autograd; also what runs on CUDA)


def _padded(targets: SparseTargets, n: int):
    """CSR -> (position, slot) indices and padded [N, K] ids / log-probs / counts with a validity mask."""
    sizes = targets.offsets[1:] - targets.offsets[:-1]
    k = int(sizes.max()) if n else 0
    device = targets.ids.device
    pos = torch.repeat_interleave(torch.arange(n, device=device), sizes)
    slot = torch.arange(targets.ids.numel(), device=device) - targets.offsets[:-1][pos]
    valid = torch.zeros(n, k, dtype=torch.bool, device=device)
    valid[pos, slot] = True
    ids = torch.zeros(n, k, dtype=torch.int64, device=device)
    ids[pos, slot] = targets.ids.long()
    logp = torch.full((n, k), -math.inf, dtype=torch.float64, device=device)
    logp[pos, slot] = targets.logprobs.double()
    counts = torch.zeros(n, k, dtype=torch.float64, device=device)
    if targets.counts is not None:
        counts[pos, slot] = targets.counts.double()
    return valid, ids, logp, counts


def bucket_loss_reference(loss: str, p: torch.Tensor, q: torch.Tensor, beta: float, alpha: float):
    """Per-row loss between bucket distributions p, q ([N, B], zeros where a bucket is absent)."""
    def xlogy_ratio(x, num, den):  # x * log(num / den), 0 where x == 0
        safe = x > 0
        return torch.where(safe, x * (torch.log(torch.where(safe, num, 1.0)) - torch.log(torch.where(safe, den, 1.0))),
                           0.0)
    if loss == "forward_kl":
        return xlogy_ratio(p, p, q).sum(-1)
    if loss == "reverse_kl":
        return xlogy_ratio(q, q, p.clamp_min(PROB_FLOOR)).sum(-1)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * xlogy_ratio(p, p, m) + (1 - beta) * xlogy_ratio(q, q, m)).sum(-1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "skew_kl":
        return xlogy_ratio(p, p, alpha * p + (1 - alpha) * q).sum(-1)
    if loss == "skew_reverse_kl":
        return xlogy_ratio(q, q, (1 - alpha) * p + alpha * q).sum(-1)
    raise ValueError(loss)


def sparse_kd_reference(logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor | None,
                        weights: torch.Tensor, config: KDConfig):
    """The kernel's maths in plain torch (differentiable): returns (total, ce (N,), kd (N,)).

    Materialises [N, V] log-softmax tensors (and, for tail ``rest``, an [N, V] mask): the memory the
    kernel avoids. Computes in float64 on CPU for the tests, float32 elsewhere.
    """
    n, vocab = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype)
    t = config.temperature
    valid, ids, logp, counts = _padded(targets, n)
    logq_all = torch.log_softmax(z / t, dim=-1)
    logq = logq_all.gather(1, ids).to(torch.float64)
    q = torch.where(valid, logq.exp(), 0.0)
    if config.loss == "sampled_ce":
        wts = counts / counts.sum(-1, keepdim=True).clamp_min(1e-30)
        kd = -(torch.where(valid, wts * logq, 0.0)).sum(-1)
    else:
        p = torch.where(valid, logp.exp(), 0.0)
        outside = torch.ones(n, vocab, dtype=torch.bool, device=z.device)
        outside[valid.nonzero(as_tuple=True)[0], ids[valid]] = False
        q_rest = torch.where(outside, logq_all, -math.inf).logsumexp(-1).exp().to(torch.float64)
        if config.tail == "rest":
            p_rest = targets.rest.to(torch.float64).clamp_min(0)
        else:  # renormalize: an empty teacher rest bucket, the stored mass renormalised to 1 below
            p_rest = torch.zeros(n, dtype=torch.float64, device=z.device)
        p = torch.cat([p, p_rest[:, None]], 1)
        q = torch.cat([q, q_rest[:, None]], 1)
        if t != 1.0:
            p = torch.where(p > 0, p.clamp_min(1e-300) ** (1.0 / t), 0.0)
        p_mass, q_mass = p.sum(-1, keepdim=True), q.sum(-1, keepdim=True)
        live = (p_mass[:, 0] > 0) & (q_mass[:, 0] > 0)
        p = p / p_mass.clamp_min(1e-300)
        q = q / q_mass.clamp_min(1e-300)
        kd = torch.where(live, bucket_loss_reference(config.loss, p, q, config.beta, config.alpha), 0.0)
    ce = torch.zeros(n, dtype=torch.float64, device=z.device)
    if labels is not None:
        has = labels >= 0
        lsm = torch.log_softmax(z, dim=-1).gather(1, labels.clamp_min(0)[:, None])[:, 0].to(torch.float64)
        ce = torch.where(has, -lsm, 0.0)
    w = weights.to(torch.float64)
    masked = w != 0
    kd = torch.where(masked, kd, 0.0)
    ce = torch.where(masked, ce, 0.0)
    total = (w * (config.ce_weight * ce + config.kd_weight * t * t * kd)).sum()
    return total, ce.detach(), kd.detach()


# --------------------------------------------------------------------------------------------------------
# autograd entry points


class _SparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, offsets, ids, logprobs, rest, counts, labels, weights, config):
        ce, kd, grad = fused_sparse_kd(logits, SparseTargets(offsets, ids, logprobs, rest, counts), labels,
                                       weights, config)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        w = weights.to(torch.float64)
        t = config.temperature
        total = (w * (config.ce_weight * ce + config.kd_weight * t * t * kd)).sum()
        ctx.mark_non_differentiable(ce, kd)
        return total.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), ce, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        (grad,) = ctx.saved_tensors
        if grad_total.item() != 1.0:
            grad = grad * grad_total
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None, None, None


def default_weights(n: int, device) -> torch.Tensor:
    """1/N per position: the mean over positions."""
    return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64, device=device)


def sparse_kd_loss(logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None, config: KDConfig = KDConfig(),
                   backend: str = "auto"):
    """Combined CE + KD loss over N positions' logits [N, V]. Returns (total, ce (N,), kd (N,)).

    backend ``auto``: the numba kernel for CPU tensors, the torch reference otherwise; ``numba`` or
    ``torch`` to force one. ``weights`` (N,): per-position weight, default 1/N; 0 masks a position out.
    """
    n, vocab = logits.shape
    check_targets(targets, n, vocab, config)
    if weights is None:
        weights = default_weights(n, logits.device)
    if backend == "auto":
        backend = "numba" if logits.device.type == "cpu" else "torch"
    if backend == "torch":
        return sparse_kd_reference(logits, targets, labels, weights, config)
    if backend != "numba":
        raise ValueError(f"unknown backend {backend!r}: auto, numba or torch")
    return _SparseKD.apply(logits, targets.offsets, targets.ids, targets.logprobs, targets.rest, targets.counts,
                           labels, weights, config)


# --------------------------------------------------------------------------------------------------------
# LM head fused with the loss, chunk by chunk of positions


class _FusedLinearKD(torch.autograd.Function):
    """logits = hidden @ weight.T computed chunk by chunk; each chunk's loss gradient is turned into
    gradients of hidden and weight at once, so no [N, V] tensor exists (Liger-Kernel's and NeMo-RL's
    approach). Gradients are computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, offsets, ids, logprobs, rest, counts, labels, weights, config, chunk_size,
                backend):
        targets = SparseTargets(offsets, ids, logprobs, rest, counts)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w = weight.detach().to(dtype)
        h = hidden.detach()
        n = h.shape[0]
        grad_h = torch.zeros(h.shape, dtype=dtype, device=h.device)
        grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device)
        ce = torch.zeros(n, dtype=torch.float64, device=h.device)
        kd = torch.zeros(n, dtype=torch.float64, device=h.device)
        for a in range(0, n, chunk_size):
            b = min(a + chunk_size, n)
            hc = h[a:b].to(dtype)
            logits = hc @ w.T
            part = targets.slice(a, b)
            lab = None if labels is None else labels[a:b]
            if backend == "numba":
                ce[a:b], kd[a:b], g = fused_sparse_kd(logits, part, lab, weights[a:b], config)
            else:
                with torch.enable_grad():
                    leaf = logits.requires_grad_(True)
                    total, ce[a:b], kd[a:b] = sparse_kd_reference(leaf, part, lab, weights[a:b], config)
                    (g,) = torch.autograd.grad(total, leaf)
            g = g.to(dtype)
            grad_h[a:b] = g @ w
            grad_w.addmm_(g.T, hc)
            del logits, g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        t = config.temperature
        total = (weights.to(torch.float64) * (config.ce_weight * ce + config.kd_weight * t * t * kd)).sum()
        ctx.mark_non_differentiable(ce, kd)
        return total.to(dtype), ce, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        if grad_total.item() != 1.0:
            grad_h, grad_w = grad_h * grad_total, grad_w * grad_total
        return (grad_h.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]),
                None, None, None, None, None, None, None, None, None, None)


def fused_linear_sparse_kd(hidden: torch.Tensor, weight: torch.Tensor, targets: SparseTargets,
                           labels: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                           config: KDConfig = KDConfig(), chunk_size: int = 1024, backend: str = "auto"):
    """The loss of ``sparse_kd_loss`` on logits = hidden @ weight.T, without ever holding those logits.

    hidden (N, H): the student's final hidden states at the N target positions (after the final norm);
    weight (V, H): the LM head (for tied embeddings, the embedding matrix itself: its gradient from here
    adds to the embedding lookup's). Positions are processed ``chunk_size`` at a time, so the extra
    memory is about 2 × chunk_size × V floats plus the gradients of hidden and weight. A bias-free head
    is assumed (as in Llama, Qwen2, GPT-2). Returns (total, ce (N,), kd (N,)).
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    check_targets(targets, n, vocab, config)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if weights is None:
        weights = default_weights(n, hidden.device)
    if backend == "auto":
        backend = "numba" if hidden.device.type == "cpu" else "torch"
    if backend not in ("numba", "torch"):
        raise ValueError(f"unknown backend {backend!r}: auto, numba or torch")
    return _FusedLinearKD.apply(hidden, weight, targets.offsets, targets.ids, targets.logprobs, targets.rest,
                                targets.counts, labels, weights, config, chunk_size, backend)
