"""The LM head fused with the sparse KD loss, chunk by chunk of positions: no [N, V] logits ever exist.

logits = hidden @ weight.T is computed ``chunk_size`` positions at a time; each chunk's loss gradient
(student.losses: the numba kernel on CPU, the torch reference elsewhere) is turned into gradients of
hidden and weight at once (Liger-Kernel's and NeMo-RL's approach), so the extra memory is about
2 × chunk_size × V floats. Tested against the unfused loss on the same logits.
"""

from __future__ import annotations

import torch

from teachercache.student.kd_types import KDConfig, SparseTargets, check_inputs, default_weights
from teachercache.student.losses import fused_sparse_kd, sparse_kd_reference


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
    check_inputs(targets, labels, n, vocab, config)
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
