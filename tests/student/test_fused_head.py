"""The chunked LM head + loss against the unchunked loss on the same logits, and gradcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import sparse_case

from teachercache.student.fused_head import fused_linear_sparse_kd
from teachercache.student.losses import KDConfig, sparse_kd_loss


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_chunked_head_equals_unchunked(tied, backend):
    logits_unused, targets, labels, weights = sparse_case(4, n=23, vocab=41)
    rng = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(23, 16, generator=rng, dtype=torch.float64)
    embed0 = torch.randn(41, 16, generator=rng, dtype=torch.float64) * 0.5
    tokens = torch.randint(0, 41, (23,), generator=rng)
    cfg = KDConfig(ce_weight=0.5, temperature=1.3)

    def run(chunk):
        hidden = hidden0.clone().requires_grad_(True)
        embed = embed0.clone().requires_grad_(True)
        head = embed if tied else embed0.clone().requires_grad_(True)
        # the tied case: the same matrix also embeds tokens, its two gradients must add up
        h = hidden + (embed[tokens] if tied else 0)
        if chunk is None:
            total, _, _ = sparse_kd_loss(h @ head.T, targets, labels, weights, cfg, backend=backend)
        else:
            total, _, _ = fused_linear_sparse_kd(h, head, targets, labels, weights, cfg, chunk, backend)
        total.backward()
        return total.detach(), hidden.grad, embed.grad, head.grad

    want = run(None)
    for chunk in (1, 5, 23, 64):
        got = run(chunk)
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_chunked_head_gradcheck():
    _, targets, labels, weights = sparse_case(8, n=5, vocab=7, max_k=3)
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    head = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_sparse_kd(h, w, targets, labels, weights, KDConfig(ce_weight=1.0), 2)[0],
        (hidden, head))
