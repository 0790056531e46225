"""Sparse KD kernels against a dense float64 computation written out position by position."""

from __future__ import annotations

import math
import multiprocessing as mp

import numpy as np
import pytest
import torch
from helpers import dense_reference, sparse_case

from teachercache.student.losses import LOSSES, KDConfig, SparseTargets, default_weights, sparse_kd_loss, sparse_kd_reference

TAILED = [loss for loss in LOSSES if loss != "sampled_ce"]


def kernel_run(logits, targets, labels, weights, cfg, backend="numba", dtype=torch.float32):
    z = logits.detach().to(dtype).requires_grad_(True)
    total, ce, kd = sparse_kd_loss(z, targets, labels, weights, cfg, backend=backend)
    total.backward()
    return total.detach().double(), z.grad.double()


CONFIGS = ([KDConfig(loss=loss, tail=tail) for loss in TAILED for tail in ("rest", "renormalize")]
           + [KDConfig(loss="sampled_ce"), KDConfig(loss="forward_kl", temperature=2.0, ce_weight=0.5),
              KDConfig(loss="jsd", beta=0.2, temperature=0.7, ce_weight=1.0, kd_weight=0.3),
              KDConfig(loss="skew_kl", alpha=0.3, tail="renormalize", temperature=1.5),
              KDConfig(loss="sampled_ce", temperature=2.0, ce_weight=0.25)])


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss}-{c.tail}-T{c.temperature}-ce{c.ce_weight}")
@pytest.mark.parametrize("adversarial", [False, True])
def test_kernel_and_reference_equal_dense_float64(cfg, adversarial):
    for seed in range(3):
        logits, targets, labels, weights = sparse_case(seed, adversarial=adversarial)
        want_loss, want_grad = dense_reference(logits, targets, labels, weights, cfg)
        for backend in ("numba", "torch"):
            loss, grad = kernel_run(logits, targets, labels, weights, cfg, backend)
            assert torch.isfinite(grad).all()
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)
        # in float64 the two agree with the dense computation to rounding
        loss64, grad64 = kernel_run(logits, targets, labels, weights, cfg, "numba", torch.float64)
        torch.testing.assert_close(loss64, want_loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad64, want_grad, rtol=1e-8, atol=1e-10)


def test_numba_equals_torch_reference_fp32_larger():
    logits, targets, labels, weights = sparse_case(7, n=64, vocab=3001, max_k=64)
    for cfg in (KDConfig(), KDConfig(loss="sampled_ce", ce_weight=1.0), KDConfig(loss="reverse_kl", tail="renormalize")):
        a_loss, a_grad = kernel_run(logits, targets, labels, weights, cfg, "numba")
        b_loss, b_grad = kernel_run(logits, targets, labels, weights, cfg, "torch")
        torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-5)
        # the kernel takes log q in float64 from the logits; the reference's float32 log_softmax rounds it
        # to float32 (reverse_kl's gradient q (log q - log p + 1) then differs by up to ~5e-6)
        torch.testing.assert_close(a_grad, b_grad, rtol=1e-4, atol=1e-5)


def test_hand_worked_forward_kl():
    # student uniform over 4 ids; teacher stores id 2 with p = 0.5, rest 0.5
    logits = torch.zeros(1, 4)
    targets = SparseTargets(torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([math.log(0.5)]),
                            torch.tensor([0.5]))
    total, _, kd = sparse_kd_loss(logits, targets, config=KDConfig())
    # buckets: p = (0.5, 0.5), q = (0.25, 0.75)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd[0].item() == pytest.approx(want, abs=1e-7)
    assert total.item() == pytest.approx(want, abs=1e-6)


def test_renormalised_forward_kl_is_axolotls_loss():
    # Axolotl's top-k KD loss: teacher log-probs renormalised over the stored ids, the student's
    # log-probs over its whole vocabulary gathered at them: sum p~ (log p~ - log_softmax(z)[ids])
    logits, targets, labels, weights = sparse_case(4, n=12, vocab=41, max_k=7)
    z_ref = logits.double().requires_grad_(True)
    want = 0.0
    for i in range(12):
        a, b = int(targets.offsets[i]), int(targets.offsets[i + 1])
        if b == a:
            continue
        lp = targets.logprobs[a:b].double()
        lp = lp - torch.logsumexp(lp, 0)
        want = want + weights[i] * (lp.exp() * (lp - torch.log_softmax(z_ref[i], -1)[targets.ids[a:b]])).sum()
    want.backward()
    for backend in ("numba", "torch"):
        total, grad = kernel_run(logits, targets, labels, weights, KDConfig(tail="renormalize"), backend)
        torch.testing.assert_close(total, want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, z_ref.grad, rtol=1e-4, atol=1e-6)


def test_ce_only_equals_cross_entropy_and_masked_positions_count_zero():
    logits, targets, labels, _ = sparse_case(3, n=8, vocab=50)
    weights = default_weights(8, "cpu").clone()
    weights[2] = 0
    cfg = KDConfig(ce_weight=1.0, kd_weight=0.0)
    z = logits.clone().requires_grad_(True)
    total, ce, _ = sparse_kd_loss(z, targets, labels, weights, cfg)
    total.backward()
    keep = torch.arange(8) != 2
    want = torch.nn.functional.cross_entropy(logits[keep].double(), labels[keep], reduction="sum") / 8
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert ce[2] == 0 and (z.grad[2] == 0).all()


def test_gradcheck_float64():
    logits, targets, labels, weights = sparse_case(11, n=4, vocab=9, max_k=3, adversarial=False)
    for cfg in (KDConfig(ce_weight=0.5), KDConfig(loss="jsd", tail="renormalize", temperature=1.7),
                KDConfig(loss="sampled_ce")):
        z = logits.double().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda x: sparse_kd_loss(x, targets, labels, weights, cfg, backend="numba")[0], (z,))


def test_bf16_logits_accepted():
    logits, targets, labels, weights = sparse_case(5)
    z = logits.bfloat16().requires_grad_(True)
    total, _, _ = sparse_kd_loss(z, targets, labels, weights, KDConfig(ce_weight=1.0))
    total.backward()
    assert z.grad.dtype == torch.bfloat16
    want, _ = dense_reference(z.detach().float(), targets, labels, weights, KDConfig(ce_weight=1.0))
    assert total.item() == pytest.approx(want.item(), rel=1e-5)


def test_bad_targets_are_refused():
    logits, targets, labels, weights = sparse_case(1)
    bad = SparseTargets(targets.offsets, targets.ids.clone(), targets.logprobs, targets.rest, targets.counts)
    bad.ids[0] = 37
    with pytest.raises(ValueError, match=r"targets.ids: position 0 has id 37 .*must lie in \[0, 37\)"):
        sparse_kd_loss(logits, bad, labels, weights)
    with pytest.raises(ValueError, match="draw counts"):
        sparse_kd_loss(logits, SparseTargets(targets.offsets, targets.ids, targets.logprobs, targets.rest),
                       config=KDConfig(loss="sampled_ce"))
    with pytest.raises(ValueError, match="unknown KD loss"):
        KDConfig(loss="kl")


def _worker_loss(_):
    logits, targets, labels, weights = sparse_case(2, n=16, vocab=101)
    z = logits.clone().requires_grad_(True)
    total, _, _ = sparse_kd_loss(z, targets, labels, weights, KDConfig(ce_weight=1.0), backend="numba")
    total.backward()
    return total.item(), z.grad.numpy().copy()


def test_kernel_under_one_torch_thread_and_in_forked_dataloader_worker():
    want_loss, want_grad = _worker_loss(0)               # the parent has launched the kernel already
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss, grad = _worker_loss(0)
    finally:
        torch.set_num_threads(previous)
    assert loss == want_loss and np.array_equal(grad, want_grad)

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return _worker_loss(i)

    loader = torch.utils.data.DataLoader(One(), batch_size=None, num_workers=2,
                                         multiprocessing_context=mp.get_context("fork"))
    for loss, grad in loader:
        assert loss == pytest.approx(want_loss, abs=0) and np.array_equal(np.asarray(grad), want_grad)


def test_reference_runs_the_same_maths_as_the_kernel_on_a_real_row():
    # a peaked teacher over 8192 ids, like the demo teacher's, top-64 with the rest bucket
    rng = np.random.default_rng(0)
    teacher = torch.log_softmax(torch.tensor(rng.standard_cauchy(8192)).clamp(-50, 50) * 2, -1)
    top = teacher.topk(64)
    targets = SparseTargets(torch.tensor([0, 64]), top.indices, top.values.float(),
                            (1 - top.values.exp().sum()).clamp_min(0)[None].float())
    logits = torch.tensor(rng.normal(0, 2, (1, 8192)), dtype=torch.float32)
    cfg = KDConfig()
    w = default_weights(1, "cpu")
    a = sparse_kd_loss(logits, targets, None, w, cfg, backend="numba")[2]
    b = sparse_kd_reference(logits, targets, None, w, cfg)[2]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
