"""Sparse knowledge-distillation losses: one fused numba kernel on CPU, a torch reference beside it.

Per target position, the teacher's stored sparse distribution (ids S, log-probs, rest mass) against the
student's q = softmax(z / T) over its full vocabulary, under a tail policy (``rest``: a (k+1)-th bucket;
``renormalize``: the stored mass scaled to 1) and one of LOSSES; total = sum_i w_i (ce_weight * CE_i +
kd_weight * T² * KD_i). docs/losses.md has every formula, the temperature rule and what is approximate.

``_fused_rows`` computes loss and gradient in one pass per row (max, exponentials, gradient), parallel
over rows, float32 rows with the vectorised exp of teachercache.numerics; the gradient is kept from the
forward and scaled in backward, so no [N, V] log-softmax exists. ``sparse_kd_reference`` is the same
maths in plain torch with autograd: it serves CUDA tensors, and the tests compare the kernel with it.
``sparse_kd_loss`` picks one by device. The chunked LM-head fusion is in student.fused_head.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from student.kd_types import LOSSES, PROB_FLOOR, KDConfig, SparseTargets, check_targets, default_weights
from teachercache.numerics import LAUNCH_LOCK, exp_row

_LOSS_CODE = {name: i for i, name in enumerate(LOSSES)}


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


@numba.njit(nogil=True, cache=True, inline="always")
def _row_max(row):
    m = row[0]
    for v in range(1, len(row)):
        if row[v] > m:
            m = row[v]
    return m


@numba.njit(nogil=True, cache=True, inline="always")
def _row_exponentials(row, m, inv_t_row, g, exact):
    """g[v] = exp((row[v] - m) / T) in the row's precision; returns their sum in float64. Float32 rows take
    the vectorised exp, float64 rows (exact=True: gradcheck, the float64 tests) libm's."""
    sum_t = 0.0
    if exact:
        for v in range(len(row)):
            e = math.exp((row[v] - m) * inv_t_row)
            g[v] = e
            sum_t += e
    else:
        sum_t = exp_row(row, m, inv_t_row, g)
    return sum_t


@numba.njit(nogil=True, cache=True, inline="always")
def _exp_sum(row, m):
    """sum_v exp(row[v] - m) in float64: CE's untempered softmax denominator when T != 1."""
    total = 0.0
    for v in range(len(row)):
        total += math.exp(row[v] - m)
    return total


@numba.njit(nogil=True, cache=True, inline="always")
def _sampled_ce_terms(row, g, ids, counts, start, k, m, inv_t, sum_t, a, q_s):
    """sampled_ce at one position: -sum_j w_j log q_j with draw weights w_j = c_j / sum c over the
    full-vocabulary q. Fills a_j = -w_j and q_s; returns (loss, gbar = sum_j a_j)."""
    total_c = 0.0
    for j in range(k):
        total_c += counts[start + j]
    loss = 0.0
    gbar = 0.0
    lse_t = m * inv_t + math.log(sum_t)
    for j in range(k):
        wj = counts[start + j] / total_c
        q_s[j] = g[ids[start + j]] / sum_t
        if wj > 0.0:  # log q_j from the logit itself: exact even where exp underflows
            loss -= wj * (row[ids[start + j]] * inv_t - lse_t)
        a[j] = -wj
        gbar += a[j]
    return loss, gbar


@numba.njit(nogil=True, cache=True, inline="always")
def _rest_sum(g, ids, start, k, sum_t):
    """The student's unnormalised mass outside the stored ids: sum_t minus the stored ids' exponentials,
    or, where that difference cancels (below 1e-4 of sum_t), the sum over the ids outside S itself."""
    sum_s = 0.0
    for j in range(k):
        sum_s += g[ids[start + j]]
    rest_sum = sum_t - sum_s
    if rest_sum < 1e-4 * sum_t:  # flip the stored ids' sign, sum the positive entries, flip back
        for j in range(k):
            g[ids[start + j]] = -g[ids[start + j]]
        rest_sum = 0.0
        for v in range(len(g)):
            if g[v] > 0.0:
                rest_sum += g[v]
        for j in range(k):
            g[ids[start + j]] = -g[ids[start + j]]
    return rest_sum


@numba.njit(nogil=True, cache=True, inline="always")
def _bucket_terms(code, g, ids, logprobs, rest, i, start, k, sum_t, renorm, tempered, inv_t, beta, alpha,
                  a, q_s):
    """The bucket losses at one position: teacher p = (stored probabilities, rest mass; none under
    ``renormalize``), re-tempered and normalised; student q = (stored ids' q, the rest of the vocabulary).
    Fills a and q_s; returns (loss, gbar = sum_b a_b, c_out, live); live is False when p or q has no mass
    (the position then contributes nothing)."""
    p = np.zeros(k + 1)
    q = np.zeros(k + 1)
    for j in range(k):
        p[j] = math.exp(np.float64(logprobs[start + j]))  # float64 exp, not float32
        q[j] = g[ids[start + j]]
    # renormalize: the teacher's rest bucket is empty, so its stored mass is renormalised to 1
    p[k] = 0.0 if renorm else max(rest[i], 0.0)
    rest_sum = _rest_sum(g, ids, start, k, sum_t)
    q[k] = rest_sum
    denom_p = 0.0
    for b in range(k + 1):
        if tempered and p[b] > 0.0:
            p[b] = p[b] ** inv_t
        denom_p += p[b]
    if not (denom_p > 0.0 and sum_t > 0.0):
        return 0.0, 0.0, 0.0, False
    for b in range(k + 1):
        p[b] /= denom_p
        q[b] /= sum_t
    loss = _bucket_loss(code, p, q, beta, alpha, a)
    gbar = 0.0
    for b in range(k + 1):
        gbar += a[b]
    for j in range(k):
        q_s[j] = q[j]
    c_out = (a[k] / rest_sum if rest_sum > 0.0 else 0.0) - gbar / sum_t
    return loss, gbar, c_out, True


@numba.njit(nogil=True, cache=True, inline="always")
def _gradient_sweep(g, row, m, ids, start, k, a, q_s, gbar, c_out, coef, ce_scale, label, sum_1, sum_t,
                    tempered):
    """Turn the exponentials in g into the row's gradient: KD's coef * c_out * e_v everywhere plus the
    corrections at the stored ids (taken before the sweep overwrites the exponentials), CE's softmax
    minus one-hot."""
    corr = np.zeros(k + 1)
    for j in range(k):
        corr[j] = coef * (a[j] - q_s[j] * gbar - g[ids[start + j]] * c_out)
    kd_scale = coef * c_out
    if ce_scale != 0.0 and tempered:
        inv_s1 = 1.0 / sum_1
        for v in range(len(g)):
            g[v] = kd_scale * g[v] + ce_scale * math.exp(row[v] - m) * inv_s1
    elif ce_scale != 0.0:
        s = kd_scale + ce_scale / sum_t
        for v in range(len(g)):
            g[v] = s * g[v]
    else:
        for v in range(len(g)):
            g[v] = kd_scale * g[v]
    for j in range(k):
        g[ids[start + j]] += corr[j]
    if ce_scale != 0.0:
        g[label] -= ce_scale


@numba.njit(nogil=True, parallel=True, cache=True)
def _fused_rows(z, offsets, ids, logprobs, counts, rest, labels, weights, code, renorm, temperature, beta,
                alpha, ce_w, kd_w, grad, ce_out, kd_out, exact):
    """Rows in parallel: row i's CE and KD into ce_out[i], kd_out[i], and the gradient of
    w_i (ce_w CE_i + kd_w T² KD_i) w.r.t. z[i] into grad[i], which holds the row's tempered exponentials
    until the final sweep. Sums are float64; per bucket b, a_b = q_b dKD/dq_b."""
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
        m = _row_max(row)
        label = labels[i]
        sum_t = _row_exponentials(row, m, inv_t_row, g, exact)
        sum_1 = _exp_sum(row, m) if tempered and label >= 0 else sum_t
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
            if code == 6:  # sampled cross-entropy over the full-vocabulary q
                loss, gbar = _sampled_ce_terms(row, g, ids, counts, start, k, m, inv_t, sum_t, a, q_s)
                kd_out[i] = loss
                c_out = -gbar / sum_t
            else:
                loss, gbar, c_out, live = _bucket_terms(code, g, ids, logprobs, rest, i, start, k, sum_t, renorm,
                                                        tempered, inv_t, beta, alpha, a, q_s)
                if live:
                    kd_out[i] = loss
                else:
                    coef = 0.0
        ce_scale = w * ce_w if label >= 0 else 0.0
        _gradient_sweep(g, row, m, ids, start, k, a, q_s, gbar, c_out, coef, ce_scale, label, sum_1, sum_t,
                        tempered)


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
