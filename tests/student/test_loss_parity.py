"""The peers' formulas, written here from their papers and docs, against the project's sparse losses.

Where a peer's loss and ours mean the same thing they must give the same number:
* TRL's generalized JSD (GKDTrainer.generalized_jsd_loss; Agarwal et al. 2024, "On-Policy Distillation of
  Language Models", Eq. 1): both logits divided by T, mixture M = beta p_T + (1 - beta) p_S,
  beta KL(p_T || M) + (1 - beta) KL(p_S || M); beta = 0 is forward KL(p_T || p_S), beta = 1 reverse KL;
  "batchmean" over tokens; no T² factor.
* The two missing-mass policies of DistillKit's sparse losses: "symmetric_uniform" spreads the teacher's
  unstored mass and the student's alike uniformly over the unstored ids (our tail ``rest``), "zero" gives the
  teacher nothing outside its renormalised stored ids against the student's full distribution (our
  ``renormalize``).
* Axolotl's top-k forward KL (its KD plugin, topk_logprob forward_kl ``loss``): sum over valid (position,
  slot) entries of p_T (log p_T - log q_S) with log q_S = z_j / T - logsumexp(z / T) over the full
  vocabulary, teacher log-probs taken as given (already at the KD temperature), times T² when T != 1,
  divided by num_items_in_batch when given, else by the number of valid entries.
* DistiLLM's skew divergences (Ko et al. 2024, "DistiLLM", arXiv 2402.03898): SKL(alpha) = KL(p || alpha p +
  (1 - alpha) q), SRKL(alpha) = KL(q || (1 - alpha) p + alpha q).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from teachercache.student.kd_types import KDConfig, SparseTargets
from teachercache.student.losses import sparse_kd_loss

N, V = 12, 40


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g, dtype=torch.float64) * 2, torch.randn(N, V, generator=g) * 1.5


def _all_but_one(teacher_logits: torch.Tensor) -> SparseTargets:
    """Every id but the last stored, so the rest bucket is one token and the bucket losses are the dense ones."""
    lp = torch.log_softmax(teacher_logits.double(), -1)
    ids = torch.arange(V - 1).repeat(N)
    return SparseTargets(torch.arange(0, N * (V - 1) + 1, V - 1), ids, lp[:, :V - 1].reshape(-1).float(),
                         lp[:, V - 1].exp().float())


def _ours(student, targets, cfg):
    weights = torch.full((N,), 1.0 / N, dtype=torch.float64)
    out = {}
    for backend in ("numba", "torch"):
        out[backend] = sparse_kd_loss(student.float(), targets, None, weights, cfg, backend=backend)[0].item()
    return out


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's generalized JSD, batchmean over the N tokens."""
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        per = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
        per = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return per.mean().item()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_trl_generalized_jsd(beta, temperature):
    teacher, student = _logits(0)
    student = student.double()
    # the teacher's rounding to float32 log-probs is part of what is compared: use the stored values
    targets = _all_but_one(teacher)
    stored = torch.cat([targets.logprobs.double().reshape(N, V - 1), targets.rest.double().log()[:, None]], 1)
    want = trl_generalized_jsd(student.float().double(), stored, beta, temperature)
    loss = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    cfg = KDConfig(loss=loss, beta=beta if loss == "jsd" else 0.5, temperature=temperature)
    for backend, total in _ours(student, targets, cfg).items():
        assert total / temperature ** 2 == pytest.approx(want, rel=2e-6), backend   # ours carries T²


def _topk(teacher_logits, k):
    lp = torch.log_softmax(teacher_logits.double(), -1)
    top = lp.topk(k, -1)
    return top, SparseTargets(torch.arange(0, N * k + 1, k), top.indices.reshape(-1), top.values.reshape(-1).float(),
                              (1 - top.values.exp().sum(-1)).clamp_min(0).float())


def _dense(loss, p, q, cfg):
    """The dense divergence of each row (float64), loss as docs/losses.md writes it."""
    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)
    if loss == "forward_kl":
        return kl(p, q)
    if loss == "reverse_kl":
        return kl(q, p.clamp_min(1e-12))
    if loss == "jsd":
        m = cfg.beta * p + (1 - cfg.beta) * q
        return cfg.beta * kl(p, m) + (1 - cfg.beta) * kl(q, m)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "skew_kl":
        return kl(p, cfg.alpha * p + (1 - cfg.alpha) * q)
    return kl(q, (1 - cfg.alpha) * p + cfg.alpha * q)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"])
def test_distillkit_symmetric_uniform_tail_is_the_rest_bucket(loss):
    teacher, student = _logits(1)
    top, targets = _topk(teacher, 8)
    cfg = KDConfig(loss=loss, tail="rest")
    # dense p', q': the stored ids as they are, the unstored mass of each side spread evenly over the V - 8 others
    q = torch.softmax(student.float().double(), -1)
    stored = torch.zeros(N, V, dtype=torch.bool).scatter_(1, top.indices, True)
    p_dense = torch.zeros(N, V, dtype=torch.float64).scatter_(1, top.indices, targets.logprobs.double().reshape(N, 8).exp())
    p_rest = targets.rest.double()[:, None]
    p_dense = torch.where(stored, p_dense, p_rest / (V - 8))
    q_rest = torch.where(stored, 0.0, q).sum(-1, keepdim=True)
    q_dense = torch.where(stored, q, q_rest / (V - 8))
    p_dense = p_dense / p_dense.sum(-1, keepdim=True)
    want = _dense(loss, p_dense, q_dense, cfg).mean().item()
    for backend, total in _ours(student, targets, cfg).items():
        assert total == pytest.approx(want, rel=1e-5), backend


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "tvd", "skew_kl"])
def test_distillkit_zero_tail_is_renormalize(loss):
    # (reverse KL and skew reverse KL differ: the student's unstored ids would each meet the 1e-12 floor)
    teacher, student = _logits(2)
    top, targets = _topk(teacher, 8)
    cfg = KDConfig(loss=loss, tail="renormalize")
    q = torch.softmax(student.float().double(), -1)
    p_stored = targets.logprobs.double().reshape(N, 8).exp()
    p_dense = torch.zeros(N, V, dtype=torch.float64).scatter_(1, top.indices, p_stored / p_stored.sum(-1, keepdim=True))
    want = _dense(loss, p_dense, q, cfg).mean().item()
    for backend, total in _ours(student, targets, cfg).items():
        assert total == pytest.approx(want, rel=1e-5), backend


def axolotl_topk_forward_kl(student_logits, ids, target_logprobs, mask, temperature, num_items_in_batch=-1):
    """Axolotl's top-k forward KL over [N, K] teacher ids / log-probs with a validity mask."""
    s = student_logits / temperature
    s_lp = s.gather(-1, ids) - torch.logsumexp(s, -1, keepdim=True)
    t_lp = target_logprobs[mask]
    total = (t_lp.exp() * (t_lp - s_lp[mask])).sum()
    if temperature != 1.0:
        total = total * temperature ** 2
    return (total / (num_items_in_batch if num_items_in_batch > 0 else mask.sum())).item()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("num_items", [-1, 7])
def test_axolotl_topk_forward_kl(temperature, num_items):
    teacher, student = _logits(3)
    k = 6
    # Axolotl's targets: top-k log-probs at the KD temperature, summing to 1 over each position's valid slots
    ids = teacher.topk(k, -1).indices
    mask = torch.ones(N, k, dtype=torch.bool)
    mask[3, 4:] = False                                          # two padded slots
    axo = torch.log_softmax(torch.where(mask, teacher.double().topk(k, -1).values / temperature, -math.inf), -1)
    want = axolotl_topk_forward_kl(student.float().double(), ids, axo, mask, temperature, num_items)
    # ours: renormalize tail; our kernel tempers the stored log-probs by 1/T, so store T x Axolotl's;
    # Axolotl's sum over entries / count is ours with per-position weights 1 / count
    keep = mask.reshape(-1)
    sizes = mask.sum(-1)
    targets = SparseTargets(torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]), ids.reshape(-1)[keep],
                            (axo * temperature).reshape(-1)[keep].float())
    count = num_items if num_items > 0 else int(mask.sum())
    weights = torch.full((N,), 1.0 / count, dtype=torch.float64)
    cfg = KDConfig(tail="renormalize", temperature=temperature)
    for backend in ("numba", "torch"):
        total = sparse_kd_loss(student, targets, None, weights, cfg, backend=backend)[0].item()
        assert total == pytest.approx(want, rel=1e-5), backend


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_distillm_skew_divergences(alpha):
    teacher, student = _logits(4)
    targets = _all_but_one(teacher)
    p = torch.cat([targets.logprobs.double().reshape(N, V - 1).exp(), targets.rest.double()[:, None]], 1)
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(student.float().double(), -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1).mean().item()
    for loss, want in (("skew_kl", kl(p, alpha * p + (1 - alpha) * q)),
                       ("skew_reverse_kl", kl(q, (1 - alpha) * p + alpha * q))):
        for backend, total in _ours(student, targets, KDConfig(loss=loss, alpha=alpha)).items():
            assert total == pytest.approx(want, rel=1e-5), (loss, backend)
