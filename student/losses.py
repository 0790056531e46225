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

from teachercache.student.kd_types import LOSSES, PROB_FLOOR, KDConfig, SparseTargets, check_inputs, default_weights
from teachercache.numerics import LAUNCH_LOCK, exp_row

_LOSS_CODE = {name: i for i, name in enumerate(LOSSES)}


# --------------------------------------------------------------------------------------------------------
# numba kernel


_LOG_FLOOR = math.log(PROB_FLOOR)
_TINY_REST = 1e-25
"""Below this share of the row's largest exponential, the student's rest mass is summed again in float64
from the logits: the float32 exponentials stop at exp(-87), and their clamp could then matter."""


@numba.njit(nogil=True, cache=True, inline="always")
def _log_add_exp(x, y):
    """log(exp(x) + exp(y)) for x, y that may be -inf."""
    if x < y:
        x, y = y, x
    if y == -math.inf:
        return x
    return x + math.log1p(math.exp(y - x))


@numba.njit(nogil=True, cache=True)
def _bucket_loss(code, lp, lq, beta, alpha, a):
    """Loss between bucket distributions given by their logs, lp (teacher) and lq (student), -inf for an
    empty bucket; a[b] = q_b * dLoss/dq_b. Every log is taken from its argument's log, so a bucket far below
    the rest keeps its exact share of the loss."""
    loss = 0.0
    log_b, log_1b = math.log(beta), math.log1p(-beta)
    log_a = math.log(alpha) if alpha > 0.0 else -math.inf
    log_1a = math.log1p(-alpha)
    for b in range(lp.shape[0]):
        pb, qb = math.exp(lp[b]), math.exp(lq[b])
        if code == 0:  # forward KL
            if pb > 0.0:
                loss += pb * (lp[b] - lq[b])
            a[b] = -pb
        elif code == 1:  # reverse KL
            d = lq[b] - max(lp[b], _LOG_FLOOR)
            if qb > 0.0:
                loss += qb * d
                a[b] = qb * (d + 1.0)
            else:
                a[b] = 0.0
        elif code == 2:  # generalised JSD, m = beta p + (1 - beta) q
            lm = _log_add_exp(log_b + lp[b], log_1b + lq[b])
            if pb > 0.0:
                loss += beta * pb * (lp[b] - lm)
            if qb > 0.0:
                d = lq[b] - lm
                loss += (1.0 - beta) * qb * d
                a[b] = (1.0 - beta) * qb * d
            else:
                a[b] = 0.0
        elif code == 3:  # total variation
            d = qb - pb
            loss += 0.5 * abs(d)
            a[b] = 0.5 * qb * (1.0 if d > 0 else (-1.0 if d < 0 else 0.0))
        elif code == 4:  # skew forward KL, m = alpha p + (1 - alpha) q
            lm = _log_add_exp(log_a + lp[b], log_1a + lq[b])
            if pb > 0.0:
                loss += pb * (lp[b] - lm)
                a[b] = -(1.0 - alpha) * math.exp(lq[b] + lp[b] - lm)
            else:
                a[b] = 0.0
        else:  # skew reverse KL, m = (1 - alpha) p + alpha q
            lm = _log_add_exp(log_1a + lp[b], log_a + lq[b])
            if qb > 0.0:
                d = lq[b] - lm
                loss += qb * d
                a[b] = qb * (d + 1.0 - math.exp(log_a + lq[b] - lm))
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
def _student_logq(row, m, ids, start, k, inv_t, log_sum_t, lq):
    """lq[j] = log q_j of the stored ids, from their logits (exact where exp(logit - max) underflows)."""
    for j in range(k):
        lq[j] = (np.float64(row[ids[start + j]]) - m) * inv_t - log_sum_t


@numba.njit(nogil=True, cache=True, inline="always")
def _sampled_ce_terms(row, m, ids, counts, start, k, inv_t, log_sum_t, a, lq):
    """sampled_ce at one position: -sum_j w_j log q_j with draw weights w_j = c_j / sum c over the
    full-vocabulary q. Fills a_j = -w_j and lq; returns (loss, gbar = sum_j a_j)."""
    _student_logq(row, m, ids, start, k, inv_t, log_sum_t, lq)
    total_c = 0.0
    for j in range(k):
        total_c += counts[start + j]
    loss = 0.0
    gbar = 0.0
    if total_c > 0.0:
        for j in range(k):
            wj = counts[start + j] / total_c
            if wj > 0.0:
                loss -= wj * lq[j]
            a[j] = -wj
            gbar += a[j]
    return loss, gbar


@numba.njit(nogil=True, cache=True, inline="always")
def _log_rest_sum(g, row, m, ids, start, k, sum_t, inv_t):
    """log of the student's unnormalised mass outside the stored ids, in g's units (exp((z - m) / T)):
    sum_t minus the stored ids' exponentials; where that difference cancels (below 1e-4 of sum_t), the sum
    over the ids outside S itself; where even that is below _TINY_REST, a float64 log-sum-exp of the
    outside logits (the float32 exponentials stop at exp(-87)). -inf when nothing lies outside S.
    The stored ids' exponentials may be overwritten (with -1): nothing reads them afterwards."""
    sum_s = 0.0
    for j in range(k):
        sum_s += g[ids[start + j]]
    rest_sum = sum_t - sum_s
    if rest_sum >= 1e-4 * sum_t:
        return math.log(rest_sum)
    for j in range(k):                           # mark the stored ids; every exponential is >= 0
        g[ids[start + j]] = -1.0
    rest_sum = 0.0
    for v in range(len(g)):
        if g[v] > 0.0:
            rest_sum += g[v]
    if rest_sum >= _TINY_REST:
        return math.log(rest_sum)
    m_out = -math.inf
    for v in range(len(g)):
        if g[v] >= 0.0 and row[v] > m_out:
            m_out = row[v]
    total = 0.0
    for v in range(len(g)):
        if g[v] >= 0.0:
            total += math.exp((np.float64(row[v]) - m_out) * inv_t)
    return (m_out - m) * inv_t + math.log(total) if total > 0.0 else -math.inf


@numba.njit(nogil=True, cache=True, inline="always")
def _bucket_terms(code, row, m, g, ids, logprobs, rest, i, start, k, sum_t, log_sum_t, renorm, inv_t, beta,
                  alpha, a, lq):
    """The bucket losses at one position: teacher p = (stored probabilities, rest mass; none under
    ``renormalize``), tempered and normalised in log space; student q = (stored ids' q, the rest of the
    vocabulary) from the logits. Fills a and lq; returns (loss, gbar = sum_b a_b, log of the student's
    unnormalised rest, live); live is False when the teacher has no mass (the position then contributes
    nothing)."""
    lp = np.empty(k + 1)
    for j in range(k):
        lp[j] = np.float64(logprobs[start + j]) * inv_t
    # renormalize: the teacher's rest bucket is empty, so its stored mass is renormalised to 1
    r = 0.0 if renorm else np.float64(rest[i])
    lp[k] = math.log(r) * inv_t if r > 0.0 else -math.inf
    top = -math.inf
    for b in range(k + 1):
        top = max(top, lp[b])
    if top == -math.inf:
        return 0.0, 0.0, 0.0, -math.inf, False
    total = 0.0
    for b in range(k + 1):
        total += math.exp(lp[b] - top)
    lse = top + math.log(total)
    for b in range(k + 1):
        lp[b] -= lse
    _student_logq(row, m, ids, start, k, inv_t, log_sum_t, lq)
    log_rest = _log_rest_sum(g, row, m, ids, start, k, sum_t, inv_t)
    lq[k] = log_rest - log_sum_t
    # normalise the buckets among themselves: the stored ids' exponentials are exact and the rest's are the
    # vectorised exp's, so sum_t may differ from their sum by ~1e-7; the gradient needs sum_b q_b = 1
    total = 0.0
    for b in range(k + 1):
        total += math.exp(lq[b])
    log_total = math.log(total)
    for b in range(k + 1):
        lq[b] -= log_total
    loss = _bucket_loss(code, lp, lq, beta, alpha, a)
    a_s = 0.0
    q_s = 0.0
    for j in range(k):
        a_s += a[j]
        q_s += math.exp(lq[j])
    d = a[k] * q_s - a_s * math.exp(lq[k]) if log_rest > -math.inf else 0.0   # nothing outside: no gradient
    return loss, a_s + a[k], d, log_rest, True


@numba.njit(nogil=True, cache=True, inline="always")
def _gradient_sweep(g, row, m, ids, start, k, a, lq, gbar, c, log_norm, coef, ce_scale, label, sum_1, sum_t,
                    inv_t, tempered):
    """Turn the exponentials in g into the row's gradient. KD, for an id v outside the stored ones:
    coef c e_v / exp(log_norm) (buckets: c = d over the rest's sum; sampled_ce: c = -gbar over sum_t); CE:
    softmax minus one-hot. The stored ids' entries are then written whole, coef (a_j - q_j gbar) plus their
    CE share: never as the outside formula plus a correction, whose two terms cancel in float32 when the
    student's rest mass is small."""
    if c != 0.0 and log_norm < math.log(_TINY_REST):
        # the outside exponentials underflowed in float32: every entry from its logit, in float64
        log_sum_1 = math.log(sum_1)
        for v in range(len(g)):
            x = (np.float64(row[v]) - m) * inv_t
            value = coef * c * math.exp(min(x - log_norm, 0.0))
            if ce_scale != 0.0:
                value += ce_scale * math.exp(np.float64(row[v]) - m - log_sum_1)
            g[v] = value
    else:
        kd_scale = coef * c * math.exp(-log_norm)
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
    log_sum_1 = math.log(sum_1)
    for j in range(k):
        v = ids[start + j]
        value = coef * (a[j] - math.exp(lq[j]) * gbar)
        if ce_scale != 0.0:
            value += ce_scale * math.exp(np.float64(row[v]) - m - log_sum_1)
        g[v] = value
    if ce_scale != 0.0:
        g[label] -= ce_scale


@numba.njit(nogil=True, parallel=True, cache=True)
def _fused_rows(z, offsets, ids, logprobs, counts, rest, labels, weights, code, renorm, temperature, beta,
                alpha, ce_w, kd_w, grad, ce_out, kd_out, exact):
    """Rows in parallel: row i's CE and KD into ce_out[i], kd_out[i], and the gradient of
    w_i (ce_w CE_i + kd_w T² KD_i) w.r.t. z[i] into grad[i], which holds the row's tempered exponentials
    until the final sweep. Sums are float64; per bucket b, a_b = q_b dKD/dq_b. A row with a NaN or +inf
    logit (or all -inf) gets NaN loss and gradient."""
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
        sum_t = _row_exponentials(row, m, inv_t_row, g, exact)
        if not (sum_t < math.inf and m < math.inf):      # NaN passes the exponentials; +inf makes m inf
            ce_out[i] = math.nan if labels[i] >= 0 else 0.0
            kd_out[i] = math.nan
            g[:] = math.nan
            continue
        log_sum_t = math.log(sum_t)
        label = labels[i]
        sum_1 = _exp_sum(row, m) if tempered and label >= 0 else sum_t
        if label >= 0:
            ce_out[i] = m + math.log(sum_1) - row[label]

        start, stop = offsets[i], offsets[i + 1]
        k = stop - start
        a = np.zeros(k + 1)      # a[k]: the rest bucket (0 for sampled_ce)
        lq = np.zeros(k + 1)
        gbar = 0.0
        c = 0.0                  # outside ids: KD gradient coef * c * e_v / exp(log_norm)
        log_norm = log_sum_t
        coef = w * kd_w * temperature
        if kd_w != 0.0 and (k > 0 or (code != 6 and not renorm)):
            if code == 6:  # sampled cross-entropy over the full-vocabulary q
                kd_out[i], gbar = _sampled_ce_terms(row, m, ids, counts, start, k, inv_t, log_sum_t, a, lq)
                c = -gbar
            else:
                loss, gbar, c, log_rest, live = _bucket_terms(code, row, m, g, ids, logprobs, rest, i, start, k,
                                                              sum_t, log_sum_t, renorm, inv_t, beta, alpha, a, lq)
                if live:
                    kd_out[i] = loss
                    log_norm = log_rest if c != 0.0 else log_sum_t
                else:
                    coef = 0.0
        ce_scale = w * ce_w if label >= 0 else 0.0
        _gradient_sweep(g, row, m, ids, start, k, a, lq, gbar, c, log_norm, coef, ce_scale, label, sum_1, sum_t,
                        inv_t, tempered)


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


def bucket_loss_reference(loss: str, lp: torch.Tensor, lq: torch.Tensor, beta: float, alpha: float):
    """Per-row loss between bucket distributions given by their logs ([N, B] float64; -inf where a bucket is
    empty): lp the teacher's, lq the student's."""
    p, q = lp.exp(), lq.exp()

    def xlogratio(x, log_num, log_den):        # x * (log_num - log_den), 0 where x == 0 (no NaN gradients)
        safe = x > 0
        return torch.where(safe, x * (torch.where(safe, log_num, 0.0) - torch.where(safe, log_den, 0.0)), 0.0)

    def log_mix(w, lx, ly):                    # log(w exp(lx) + (1 - w) exp(ly)), -inf where both are empty
        a = lx + math.log(w) if w > 0 else torch.full_like(lx, -math.inf)
        b = ly + math.log1p(-w) if w < 1 else torch.full_like(ly, -math.inf)
        empty = torch.isneginf(a) & torch.isneginf(b)
        return torch.where(empty, -math.inf, torch.logaddexp(torch.where(empty, 0.0, a), torch.where(empty, 0.0, b)))

    if loss == "forward_kl":
        return xlogratio(p, lp, lq).sum(-1)
    if loss == "reverse_kl":
        return xlogratio(q, lq, lp.clamp_min(math.log(PROB_FLOOR))).sum(-1)
    if loss == "jsd":
        lm = log_mix(beta, lp, lq)
        return (beta * xlogratio(p, lp, lm) + (1 - beta) * xlogratio(q, lq, lm)).sum(-1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "skew_kl":
        return xlogratio(p, lp, log_mix(alpha, lp, lq)).sum(-1)
    if loss == "skew_reverse_kl":
        return xlogratio(q, lq, log_mix(1 - alpha, lp, lq)).sum(-1)
    raise ValueError(loss)


def sparse_kd_reference(logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor | None,
                        weights: torch.Tensor, config: KDConfig):
    """The kernel's maths in plain torch (differentiable): returns (total, ce (N,), kd (N,)).

    The student's buckets are a softmax over bucket logits: u_j = (z_j - max) / T of the stored ids, taken
    in float64, and u_rest = log-sum-exp of the others (an [N, V] masked reduction in the logits' precision,
    the memory the kernel avoids; sampled_ce, which has no rest bucket, gathers from the row's log-softmax). Their float64 softmax gives every bucket's log q, normalised among
    themselves, so autograd forms a_b - q_b sum(a) in float64 and reaches the logits through the
    log-sum-exp's softmax alone: no float32 difference of two large terms, as in the kernel. Float64 logits
    are computed in float64 throughout (the tests), anything else in float32 (CUDA).
    """
    n, vocab = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype)
    t = config.temperature
    valid, ids, logp, counts = _padded(targets, n)
    if config.loss == "sampled_ce":   # no rest bucket: log q of the draws from the row's log-softmax
        lq = torch.log_softmax(z / t, -1).gather(1, ids).to(torch.float64)
        wts = counts / counts.sum(-1, keepdim=True).clamp_min(1e-30)
        kd = -(torch.where(valid & (wts > 0), wts * torch.where(valid, lq, 0.0), 0.0)).sum(-1)
    else:
        m = z.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)              # a non-finite row stays non-finite below
        outside = torch.ones(n, vocab, dtype=torch.bool, device=z.device)
        outside[valid.nonzero(as_tuple=True)[0], ids[valid]] = False
        u_rest = torch.where(outside, (z - m) / t, -math.inf).logsumexp(-1).to(torch.float64)
        u_stored = torch.where(valid, (z.gather(1, ids).to(torch.float64) - m.to(torch.float64)) / t, -math.inf)
        lq = torch.log_softmax(torch.cat([u_stored, u_rest[:, None]], 1), -1)  # [N, k + 1], float64
        if config.tail == "rest":
            lp_rest = targets.rest.to(torch.float64).log()
        else:  # renormalize: an empty teacher rest bucket, the stored mass renormalised to 1 below
            lp_rest = torch.full((n,), -math.inf, dtype=torch.float64, device=z.device)
        lp = torch.cat([logp, lp_rest[:, None]], 1) / t        # tempered, then normalised in log space
        lp_mass = lp.logsumexp(-1, keepdim=True)
        live = lp_mass[:, 0] > -math.inf                        # the teacher has mass at the position
        lp = torch.where(live[:, None], lp - torch.where(live[:, None], lp_mass, 0.0), -math.inf)
        kd = torch.where(live, bucket_loss_reference(config.loss, lp, lq, config.beta, config.alpha), 0.0)
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
    check_inputs(targets, labels, n, vocab, config)
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
