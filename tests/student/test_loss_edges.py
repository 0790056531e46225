"""The sparse KD losses where training ends up and where inputs go wrong: a confident student (logit gaps up
to 80, a stored id 180 nats down), temperatures 0.01 … 100, non-finite logits, and every malformed input
refused at the boundary with the same message by both backends and the fused head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import dense_reference, sparse_case

from teachercache.student.fused_head import fused_linear_sparse_kd
from teachercache.student.kd_types import (CHECKS, IGNORE_INDEX, LOSSES, KDConfig, SparseTargets, _first_failure,
                              _first_failure_torch, check_inputs, rest_tempering)
from teachercache.student.losses import sparse_kd_loss

TAILED = [loss for loss in LOSSES if loss != "sampled_ce"]
SWEEP_CONFIGS = [KDConfig(loss=loss, tail=tail) for loss in TAILED for tail in ("rest", "renormalize")] + [
    KDConfig(loss="sampled_ce")]
GAPS = (0.0, 5.0, 10.0, 20.0, 28.0, 40.0, 60.0, 80.0)
RESTS = (0.0, 1e-3, 0.1, 0.5, 0.9)


def confident_case(vocab: int = 256, k: int = 8):
    """Rows of a student growing confident: logit gap 0 … 80 on four stored ids or on one unstored id,
    teacher rest mass 0 … 0.9; a last row with a stored id 180 nats below the student's max."""
    rng = np.random.default_rng(0)
    logits, offsets, ids, logprobs, rest, counts = [], [0], [], [], [], []
    cases = [(g, r, where) for g in GAPS for r in RESTS for where in ("stored", "unstored")] + [(80.0, 0.5, "far")]
    for gap, r, where in cases:
        z = rng.normal(0, 1, vocab)
        chosen = rng.permutation(vocab)[:k]
        if where == "unstored":
            z[np.setdiff1d(np.arange(vocab), chosen)[0]] += gap
        else:
            z[chosen[:4]] += gap
        if where == "far":
            z[chosen[-1]] -= 100.0
        p = rng.dirichlet(np.ones(k)) * (1 - r)
        logits.append(z)
        ids.append(chosen)
        logprobs.append(np.log(p))
        rest.append(r)
        counts.append(rng.integers(1, 9, k))
        offsets.append(offsets[-1] + k)
    targets = SparseTargets(torch.tensor(offsets), torch.tensor(np.concatenate(ids)),
                            torch.tensor(np.concatenate(logprobs), dtype=torch.float32),
                            torch.tensor(rest, dtype=torch.float32),
                            torch.tensor(np.concatenate(counts), dtype=torch.float32))
    return torch.tensor(np.stack(logits), dtype=torch.float32), targets


def assert_gradient_close(got, want, weights, cfg, rel=1e-4):
    """The float32 gradient against the float64 one, row by row. Row i's scale is s_i = w_i (T kd_weight +
    ce_weight): its entries are s_i times O(1)-O(30) factors. Relative error <= rel at every entry that is
    >= 1e-6 of its row's largest (the criterion asked for), >= 1e-9 s_i and >= 1e-30; absolute error
    <= 1e-9 s_i + rel |want| at every entry. Below 1e-9 s_i the float64 autograd reference is itself
    rounding noise: it forms such entries as differences of terms ~s_i at float64's 1e-16 (e.g. the
    confident id of a reverse-KL row whose rest bucket already holds all but 4e-16 of the mass); below 1e-30
    float32 is near its subnormal range."""
    got, want = got.double(), want.double()
    s = (weights.double().abs() * (cfg.temperature * cfg.kd_weight + cfg.ce_weight))[:, None]
    diff = (got - want).abs()
    bad_abs = diff > 1e-9 * s + rel * want.abs()
    assert not bad_abs.any(), f"absolute error {float(diff[bad_abs].max()):.2e} at {bad_abs.nonzero()[0].tolist()}"
    scale = want.abs().amax(1, keepdim=True)
    checked = (want.abs() >= 1e-6 * scale) & (want.abs() >= 1e-9 * s) & (want.abs() >= 1e-30)
    err = torch.where(checked, diff / want.abs().clamp_min(1e-300), 0.0)
    row, col = divmod(int(err.argmax()), want.shape[1])
    assert float(err.max()) <= rel, (f"row {row} id {col}: got {float(got[row, col])!r}, want "
                                     f"{float(want[row, col])!r} (relative error {float(err.max()):.2e})")


def _grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    total = fn(x)
    total.backward()
    return total.detach().double(), x.grad


def three_ways(logits, targets, cfg, labels=None, weights=None):
    """(total, gradient) from the numba kernel, the torch reference and the fused head (identity LM head,
    so its hidden-state gradient is the logits' gradient), all in float32."""
    eye = torch.eye(logits.shape[1])
    return {
        "numba": _grad(lambda x: sparse_kd_loss(x, targets, labels, weights, cfg, backend="numba")[0], logits),
        "torch": _grad(lambda x: sparse_kd_loss(x, targets, labels, weights, cfg, backend="torch")[0], logits),
        "fused_head": _grad(lambda h: fused_linear_sparse_kd(h, eye, targets, labels, weights, cfg, chunk_size=16)[0],
                            logits),
    }


@pytest.mark.parametrize("cfg", SWEEP_CONFIGS, ids=lambda c: f"{c.loss}-{c.tail}")
def test_confident_student_gradients_match_float64(cfg):
    logits, targets = confident_case()
    labels = torch.full((logits.shape[0],), IGNORE_INDEX)
    weights = torch.full((logits.shape[0],), 1.0 / logits.shape[0], dtype=torch.float64)
    want_total, want_grad = dense_reference(logits, targets, labels, weights, cfg)
    for name, (total, grad) in three_ways(logits, targets, cfg).items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(total, want_total, rtol=1e-5, atol=0, msg=name)
        assert_gradient_close(grad, want_grad, weights, cfg)


def test_the_reported_cancellation_case():
    # issue 17's reproduction: four stored ids at 1/8 each, rest 1/2; the student puts its mass on them
    targets = SparseTargets(torch.tensor([0, 4]), torch.arange(4), torch.full((4,), math.log(0.125)),
                            torch.tensor([0.5]))
    for gap in (24.0, 28.0, 80.0):
        z = torch.zeros(1, 512)
        z[0, :4] = gap
        for name, (_, grad) in three_ways(z, targets, KDConfig()).items():
            # d KL / d z_0 = q_0 - p_0 = 1/4 - 1/8 (the buckets' q is 1/4 each, p 1/8 each)
            assert grad[0, 0].item() == pytest.approx(0.125, rel=1e-5), (name, gap)
            # each of the 508 outside ids takes -p_rest / 508 (+ its own q, ~e^-gap)
            assert grad[0, 100].item() == pytest.approx(-0.5 / 508, rel=1e-5), (name, gap)


def test_forward_kl_of_a_stored_id_far_below_is_exact():
    # a stored id 100 nats below the student's max: log q from the logit, not from a clamped exp
    targets = SparseTargets(torch.tensor([0, 2]), torch.tensor([0, 1]),
                            torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([0.2]))
    z = torch.zeros(1, 64)
    z[0, 0] = 100.0
    lq1 = 0.0 - torch.logsumexp(z[0].double(), 0).item()
    lq0 = 100.0 - torch.logsumexp(z[0].double(), 0).item()
    lq_rest = math.log(62) + lq1
    want = 0.5 * (math.log(0.5) - lq0) + 0.3 * (math.log(0.3) - lq1) + 0.2 * (math.log(0.2) - lq_rest)
    for backend in ("numba", "torch"):
        kd = sparse_kd_loss(z, targets, backend=backend)[2]
        assert kd.item() == pytest.approx(want, rel=1e-6), backend


@pytest.mark.parametrize("temperature", [0.01, 0.03, 0.1, 0.5, 2.0, 10.0, 100.0])
def test_temperature_sweep_matches_float64(temperature):
    for cfg in (KDConfig(temperature=temperature, ce_weight=0.5), KDConfig(loss="jsd", temperature=temperature),
                KDConfig(loss="reverse_kl", tail="renormalize", temperature=temperature),
                KDConfig(loss="sampled_ce", temperature=temperature)):
        for seed, adversarial in ((0, False), (1, True)):
            logits, targets, labels, weights = sparse_case(seed, adversarial=adversarial)
            want_total, want_grad = dense_reference(logits, targets, labels, weights, cfg)
            for name, (total, grad) in three_ways(logits, targets, cfg, labels, weights).items():
                assert torch.isfinite(total) and torch.isfinite(grad).all(), name
                torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-7, msg=f"{name} {cfg}")
                assert_gradient_close(grad, want_grad, weights, cfg)


def test_flat_teacher_at_low_temperature_stays_finite():
    # the teacher's 8 stored ids nearly equal: p^(1/T) underflows in linear space at T = 0.01
    vocab = 512
    targets = SparseTargets(torch.tensor([0, 8]), torch.arange(8),
                            (torch.full((8,), -math.log(vocab)) + torch.linspace(0, 0.02, 8)).float(),
                            torch.tensor([1 - 8 / vocab]))
    z = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    for temperature in (0.005, 0.01):
        cfg = KDConfig(tail="renormalize", temperature=temperature)
        want, _ = dense_reference(z, targets, torch.tensor([IGNORE_INDEX]), torch.ones(1, dtype=torch.float64), cfg)
        for backend in ("numba", "torch"):
            total = sparse_kd_loss(z, targets, None, torch.ones(1, dtype=torch.float64), cfg, backend=backend)[0]
            assert math.isfinite(total.item()) and total.item() > 0
            assert total.item() == pytest.approx(want.item(), rel=1e-5), (backend, temperature)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_non_finite_logits_give_a_nan_loss(bad):
    logits, targets, labels, weights = sparse_case(3)
    logits = logits.clone()
    if bad == "all -inf":
        logits[2] = -math.inf
    else:
        logits[2, 5] = bad
    for cfg in (KDConfig(), KDConfig(loss="sampled_ce", ce_weight=1.0)):
        for backend in ("numba", "torch"):
            total, ce, kd = sparse_kd_loss(logits, targets, labels, weights, cfg, backend=backend)
            assert math.isnan(total.item()), (backend, cfg.loss)
            assert math.isnan(kd[2].item()) and torch.isfinite(kd[torch.arange(10) != 2]).all()
        total = fused_linear_sparse_kd(logits, torch.eye(37), targets, labels, weights, cfg)[0]
        assert math.isnan(total.item())


def _mutations():
    """(name, mutate(targets, labels) -> (targets, labels), expected message) of every refused input."""
    def with_(t, **kw):
        fields = dict(offsets=t.offsets, ids=t.ids, logprobs=t.logprobs, rest=t.rest, counts=t.counts)
        return SparseTargets(**{**fields, **kw})

    def set_at(tensor, index, value):
        out = tensor.clone()
        out[index] = value
        return out

    return [
        ("offsets don't start at 0", lambda t, y: (with_(t, offsets=t.offsets + 1), y),
         r"targets.offsets: position 0 has offset 1; offsets must start at 0"),
        ("offsets decrease", lambda t, y: (with_(t, offsets=set_at(t.offsets, 3, int(t.offsets[2]) - 1)), y),
         r"targets.offsets: position 2 has offset \d+ then \d+; offsets must start at 0, never decrease"),
        ("offsets end short", lambda t, y: (with_(t, offsets=set_at(t.offsets, -1, int(t.offsets[-1]) - 1),
                                                  ids=t.ids), y),
         r"targets.offsets: position 10 has offset \d+ with \d+ ids"),
        ("label >= vocab", lambda t, y: (t, set_at(y, 4, 37)),
         r"labels: position 4 has label 37; labels must lie in \[0, 37\) or be the ignore index -100"),
        ("negative label", lambda t, y: (t, set_at(y, 6, -5)), r"labels: position 6 has label -5"),
        ("id >= vocab", lambda t, y: (with_(t, ids=set_at(t.ids, 5, 40)), y),
         r"targets.ids: position \d+ has id 40 \(entry \d\); stored ids must lie in \[0, 37\)"),
        ("duplicate id", lambda t, y: (with_(t, ids=set_at(t.ids, int(t.offsets[3]) + 1, t.ids[int(t.offsets[3])])), y),
         r"targets.ids: position 3 has id \d+ twice \(entry 1 repeats it\); the ids of one position must be distinct"),
        ("log-prob > 0", lambda t, y: (with_(t, logprobs=set_at(t.logprobs, 7, 0.5)), y),
         r"targets.logprobs: position \d+ has log-prob 0.5 \(entry \d, id \d+\); teacher log-probs must be <= 0"),
        ("log-prob NaN", lambda t, y: (with_(t, logprobs=set_at(t.logprobs, 7, math.nan)), y),
         r"targets.logprobs: position \d+ has log-prob nan"),
        ("log-prob +inf", lambda t, y: (with_(t, logprobs=set_at(t.logprobs, 7, math.inf)), y),
         r"targets.logprobs: position \d+ has log-prob inf"),
        ("rest NaN", lambda t, y: (with_(t, rest=set_at(t.rest, 2, math.nan)), y),
         r"targets.rest: position 2 has rest mass nan; the rest mass must lie in \[0, 1\]"),
        ("rest < 0", lambda t, y: (with_(t, rest=set_at(t.rest, 2, -0.25)), y), r"position 2 has rest mass -0.25"),
        ("rest > 1", lambda t, y: (with_(t, rest=set_at(t.rest, 8, 1.5)), y), r"position 8 has rest mass 1.5"),
        ("negative count", lambda t, y: (with_(t, counts=set_at(t.counts, 3, -4.0)), y),
         r"targets.counts: position \d+ has draw count -4.0 \(entry \d, id \d+\); draw counts must be finite and >= 0"),
        ("count NaN", lambda t, y: (with_(t, counts=set_at(t.counts, 3, math.nan)), y), r"has draw count nan"),
        ("count inf", lambda t, y: (with_(t, counts=set_at(t.counts, 3, math.inf)), y), r"has draw count inf"),
        ("too few log-probs", lambda t, y: (with_(t, logprobs=t.logprobs[:-1]), y),
         r"targets.logprobs: \d+ values where \d+ are needed"),
    ]


@pytest.mark.parametrize("name,mutate,message", _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_inputs_are_refused_by_every_path_with_one_message(name, mutate, message):
    logits, targets, labels, weights = sparse_case(1, adversarial=True)
    targets, labels = mutate(targets, labels)
    messages = set()
    for cfg in (KDConfig(ce_weight=1.0), KDConfig(loss="sampled_ce", ce_weight=1.0)):
        for backend in ("numba", "torch"):
            with pytest.raises(ValueError, match=message) as err:
                sparse_kd_loss(logits, targets, labels, weights, cfg, backend=backend)
            messages.add(str(err.value))
        with pytest.raises(ValueError, match=message) as err:
            fused_linear_sparse_kd(logits, torch.eye(37), targets, labels, weights, cfg)
        messages.add(str(err.value))
    assert len(messages) == 1


@pytest.mark.parametrize("name,mutate,message", _mutations()[:-1], ids=[m[0] for m in _mutations()[:-1]])
def test_the_torch_scan_finds_what_the_numba_scan_finds(name, mutate, message):
    # the vectorised scan serves CUDA tensors; on CPU both can run, and they must agree
    _, targets, labels, _ = sparse_case(1, adversarial=True)
    targets, labels = mutate(targets, labels)
    arrays = (targets.offsets, targets.ids, targets.logprobs, targets.rest, targets.counts, labels)
    want = _first_failure(*(a.numpy() for a in arrays[:2]), *(a.float().numpy() for a in arrays[2:5]),
                          arrays[5].long().numpy(), 37, 1e-4)
    assert want[0] >= 0
    assert _first_failure_torch(*arrays, 37, 1e-4) == tuple(want)


def test_valid_inputs_pass_both_scans():
    _, targets, labels, _ = sparse_case(2, n=50, vocab=300, max_k=40, adversarial=True)
    arrays = (targets.offsets, targets.ids, targets.logprobs, targets.rest, targets.counts, labels)
    assert _first_failure_torch(*arrays, 300, 1e-4) == (-1, -1, -1)
    check_inputs(targets, labels, 50, 300, KDConfig())
    assert set(CHECKS) == {"offsets", "labels", "ids", "duplicate", "logprobs", "rest", "counts"}


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_finite_and_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        KDConfig(temperature=temperature)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_rest_tempering_bounds_hold_the_full_distributions_value(temperature):
    # a full teacher distribution, stored as top-8: the tempered rest share the full distribution gives lies
    # within the computed bounds; the one-token tempering the loss uses lies outside them
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(64, 500, generator=g, dtype=torch.float64) * 2, -1)
    top = lp.topk(8, -1)
    rest = 1 - top.values.exp().sum(-1)
    targets = SparseTargets(torch.arange(0, 64 * 8 + 1, 8), top.indices.reshape(-1), top.values.reshape(-1).float(),
                            rest.float())
    found = rest_tempering(targets, temperature, 500)
    outside = torch.ones_like(lp, dtype=torch.bool).scatter_(1, top.indices, False)
    full_rest = torch.where(outside, lp / temperature, -math.inf).logsumexp(-1).exp()
    stored = (top.values / temperature).exp().sum(-1)
    full_share = float((full_rest / (stored + full_rest)).mean())
    approx_share = float((rest ** (1 / temperature) / (stored + rest ** (1 / temperature))).mean())
    assert found["positions"] == 64
    assert found["low"] <= full_share <= found["high"]
    assert found["approx"] == pytest.approx(approx_share, rel=1e-5)
    assert (found["approx"] < found["low"]) if temperature > 1 else (found["approx"] > found["high"])
