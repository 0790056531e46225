"""Targets against an independent dense computation (float64 numpy: full log-softmax, sort, cumulative
sum, counts), on Llama-, GPT-2- and Qwen2-style tiny models built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from teachercache.format.manifest import TargetSpec
from teachercache.teacher.targets import (compute_targets, join_targets, position_targets, position_uniforms,
                                         row_generator)

V_TOKENIZER = 300


def _model(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def _batch(kind: str, vocab_out: int, B=3, T=24, spread=3.5):
    model = _model(kind, vocab_out)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V_TOKENIZER, (B, T), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
    logits = logits / logits.std() * spread  # sharper than a random init: a peaked, long-tailed teacher
    mask = torch.rand((B, T), generator=g) < 0.8
    mask[:, -1] = False
    return logits, ids, mask


def _dense(logits, ids, mask, temperature=1.0):
    """float64 reference per target position: (log-probs over the tokenizer vocab, label, entropy)."""
    x = logits[..., :V_TOKENIZER].double().numpy() / temperature
    lp = x - x.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    rows, cols = np.nonzero(mask.numpy())
    lp = lp[rows, cols]
    labels = ids.numpy()[rows, cols + 1]
    return lp, lp[np.arange(len(lp)), labels], -(np.exp(lp) * lp).sum(-1), rows


def _positions(t):
    return [(t.target_ids[a:b], t.target_logprobs[a:b], None if t.target_counts is None else t.target_counts[a:b])
            for a, b in zip(t.target_offsets, t.target_offsets[1:])]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("vocab_out", [V_TOKENIZER, V_TOKENIZER + 20], ids=["exact", "padded"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_topk_and_nucleus_equal_the_dense_reference(kind, vocab_out, backend):
    logits, ids, mask = _batch(kind, vocab_out)
    lp, label, entropy, _ = _dense(logits, ids, mask, temperature=1.5)
    order = np.argsort(-lp, axis=1, kind="stable")
    for spec in (TargetSpec(kind="topk", k=16, temperature=1.5),
                 TargetSpec(kind="nucleus", k=None, top_p=0.9, min_k=2, max_k=40, temperature=1.5)):
        t = compute_targets(logits, ids, mask, spec, V_TOKENIZER, chunk_positions=7, backend=backend)
        assert len(t.label_logprob) == int(mask.sum())
        np.testing.assert_allclose(t.label_logprob, label, atol=1e-5)
        np.testing.assert_allclose(t.entropy, entropy, atol=1e-4)
        for p, (got_ids, got_lp, _) in enumerate(_positions(t)):
            if spec.kind == "topk":
                n = 16
            else:
                mass = np.cumsum(np.exp(lp[p, order[p]]))
                n = int(np.clip((mass < 0.9).sum() + 1, 2, 40))
            want = order[p, :n]
            assert sorted(got_ids.tolist()) == sorted(want.tolist())
            assert (got_ids < V_TOKENIZER).all()  # padding columns never stored
            np.testing.assert_allclose(got_lp, lp[p, got_ids], atol=1e-5)
            np.testing.assert_allclose(t.rest_mass[p], 1 - np.exp(lp[p, want]).sum(), atol=1e-5)
    sizes = np.diff(t.target_offsets)
    assert sizes.min() >= 2 and sizes.max() <= 40 and len(set(sizes.tolist())) > 1  # adaptive k


def test_numba_top_k_keeps_the_smaller_id_on_a_tie_and_matches_torch_at_scale():
    # ties: logits 0..9 with the values 3.0 at ids 2, 5, 7 and 1.0 elsewhere; k = 2 keeps ids 2 and 5
    logits = torch.ones(1, 3, 10)
    logits[0, :, [2, 5, 7]] = 3.0
    ids = torch.zeros(1, 3, dtype=torch.long)
    mask = torch.tensor([[True, True, False]])
    t = compute_targets(logits, ids, mask, TargetSpec(kind="topk", k=2), 10, backend="numba")
    assert t.target_ids.tolist() == [2, 5, 2, 5]
    want = 3.0 - np.log(3 * np.exp(3.0) + 7 * np.exp(1.0))
    np.testing.assert_allclose(t.target_logprobs, want, atol=1e-6)
    # a realistic vocabulary: both backends store the same ids (in the same order) and values
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 64, 8192, generator=g) * 2.5
    ids = torch.randint(0, 8192, (2, 64), generator=g)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[:, -1] = False
    for spec in (TargetSpec(kind="topk", k=64), TargetSpec(kind="nucleus", k=None, top_p=0.5, min_k=1, max_k=64)):
        a = compute_targets(logits, ids, mask, spec, 8192, backend="numba")
        b = compute_targets(logits, ids, mask, spec, 8192, backend="torch")
        np.testing.assert_array_equal(a.target_offsets, b.target_offsets)
        np.testing.assert_array_equal(a.target_ids, b.target_ids)
        for name in ("target_logprobs", "label_logprob", "rest_mass"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=2e-5, err_msg=name)
        # entropy: torch's float32 dot over 8192 terms errs by ~2e-4 here, the numba pass (float64 sums) not
        lp = torch.log_softmax(logits[mask].double(), -1)
        dense = -(lp.exp() * lp).sum(-1).numpy()
        np.testing.assert_allclose(a.entropy, dense, atol=1e-5)
        np.testing.assert_allclose(b.entropy, dense, atol=1e-3)
    with pytest.raises(ValueError, match="numba backend"):
        compute_targets(logits, ids, mask, TargetSpec(kind="sample", k=None, samples=4, seed=1), 8192,
                        backend="numba")


def test_numba_top_k_matches_a_full_sort_on_awkward_rows():
    """_top_k bounds the k-th largest entry by a histogram of block maxima; whatever the row (peaked,
    flat, tied, -inf entries, one finite value, shorter than k blocks), it must give what a full sort
    by (value descending, id ascending) gives."""
    from teachercache.teacher.targets import _BLOCK, _block_maxima, _top_k

    rng = np.random.default_rng(5)
    rows = {"normal": rng.normal(0, 3, 8192), "peaked": np.r_[40.0, rng.normal(-10, 1, 8191)],
            "flat": np.zeros(8192), "two values": np.where(rng.random(8192) < 0.01, 2.0, -1.0),
            "coarse ties": np.round(rng.normal(0, 2, 8192)), "-inf mostly": np.where(rng.random(8192) < 0.9,
            -np.inf, rng.normal(0, 1, 8192)), "one finite": np.r_[1.0, np.full(8191, -np.inf)],
            "huge range": rng.normal(0, 1, 8192) * np.where(rng.random(8192) < 0.01, 1e30, 1.0),
            "short": rng.normal(0, 1, 300)}
    for name, row in rows.items():
        row = row.astype(np.float32)
        for k in (1, 7, 64):
            maxima = np.empty((len(row) + _BLOCK - 1) // _BLOCK, np.float32)
            _block_maxima(row, maxima)
            keys = np.empty(k, np.int64)
            _top_k(row, maxima, keys)
            got = (0xFFFFFFFF - (keys & 0xFFFFFFFF)).tolist()
            want = np.lexsort((np.arange(len(row)), -row.astype(np.float64)))[:k].tolist()
            assert got == want, (name, k)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sampled_targets_equal_inverse_cdf_draws_and_do_not_depend_on_batching(kind):
    logits, ids, mask = _batch(kind, V_TOKENIZER + 20)
    spec = TargetSpec(kind="sample", k=None, samples=64, seed=5)
    rows_global = [10, 11, 12]
    t = compute_targets(logits, ids, mask, spec, V_TOKENIZER, row_indices=rows_global, chunk_positions=5)
    lp, _, _, rows = _dense(logits, ids, mask)
    # independent reference: the same per-row uniforms, a float64 CDF, numpy counting
    cols = np.nonzero(mask.numpy())[1]
    uniforms = {r: torch.rand((ids.shape[1], 64), generator=row_generator(5, rows_global[r], torch.device("cpu")))
                .double().numpy() for r in range(3)}
    same = 0
    for p, (got_ids, got_lp, got_counts) in enumerate(_positions(t)):
        r = rows[p]
        u = uniforms[r][cols[p]]
        cdf = np.cumsum(np.exp(lp[p]))
        draws = np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), V_TOKENIZER - 1)
        want_ids, want_counts = np.unique(draws, return_counts=True)
        same += np.array_equal(got_ids, want_ids) and np.array_equal(got_counts, want_counts)
        assert got_counts.sum() == 64 and len(set(got_ids.tolist())) == len(got_ids)
        np.testing.assert_allclose(got_lp, lp[p, got_ids], atol=1e-5)
        np.testing.assert_allclose(t.rest_mass[p], 1 - np.exp(lp[p, got_ids]).sum(), atol=1e-5)
    assert same >= 0.98 * len(rows)  # float32 vs float64 CDFs may split a draw at a boundary
    # batching: each row alone gives the same targets as the batch
    alone = [compute_targets(logits[r:r + 1], ids[r:r + 1], mask[r:r + 1], spec, V_TOKENIZER,
                             row_indices=[rows_global[r]]) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([a.target_ids for a in alone]), t.target_ids)
    np.testing.assert_array_equal(np.concatenate([a.target_counts for a in alone]), t.target_counts)
    unchunked = compute_targets(logits, ids, mask, spec, V_TOKENIZER, row_indices=rows_global)
    np.testing.assert_array_equal(unchunked.target_counts, t.target_counts)


def test_sampled_counts_estimate_the_teacher_distribution():
    logits, ids, mask = _batch("llama", V_TOKENIZER, B=1, T=4)
    mask[:] = False
    mask[0, 0] = True
    t = compute_targets(logits, ids, mask, TargetSpec(kind="sample", k=None, samples=60_000, seed=1), V_TOKENIZER)
    lp, _, _, _ = _dense(logits, ids, mask)
    est = np.zeros(V_TOKENIZER)
    est[t.target_ids] = t.target_counts / 60_000
    assert np.abs(est - np.exp(lp[0])).max() < 0.01


@pytest.mark.parametrize("spec, problem", [
    (TargetSpec(kind="topk", k=0), "--k"), (TargetSpec(kind="topk", k=301), "--k"),
    (TargetSpec(kind="nucleus", k=None, top_p=1.5, min_k=1, max_k=4), "--top-p"),
    (TargetSpec(kind="nucleus", k=None, top_p=0.9, min_k=5, max_k=4), "--min-k"),
    (TargetSpec(kind="sample", k=None, samples=0, seed=1), "--samples"),
    (TargetSpec(kind="sample", k=None, samples=8, seed=None), "--seed"),
    (TargetSpec(kind="topk", k=4, temperature=0.0), "--temperature"),
])
def test_bad_specs_are_refused_naming_the_option(spec, problem):
    logits, ids, mask = _batch("gpt2", V_TOKENIZER, B=1, T=4)
    with pytest.raises(ValueError, match=problem):
        compute_targets(logits, ids, mask, spec, V_TOKENIZER)


def test_shape_errors():
    logits, ids, mask = _batch("gpt2", V_TOKENIZER, B=1, T=4)
    with pytest.raises(ValueError, match="output columns"):
        compute_targets(logits, ids, mask, TargetSpec(), V_TOKENIZER + 1)
    mask[0, -1] = True
    with pytest.raises(ValueError, match="last position"):
        compute_targets(logits, ids, mask, TargetSpec(k=4), V_TOKENIZER)


@pytest.mark.parametrize("spec,backend", [(TargetSpec(kind="topk", k=12, temperature=1.5), "torch"),
                                          (TargetSpec(kind="topk", k=12, temperature=1.5), "numba"),
                                          (TargetSpec(kind="nucleus", top_p=0.8, min_k=2, max_k=40), "numba"),
                                          (TargetSpec(kind="nucleus", top_p=0.8, min_k=2, max_k=40), "torch"),
                                          (TargetSpec(kind="sample", samples=24, seed=7), "torch")])
def test_position_targets_in_chunks_equal_the_batch_targets(spec, backend):
    """The chunked teacher pass: targets of the target positions' logits alone, a few positions at a time
    (uniforms of sampled targets from position_uniforms), joined, equal compute_targets on the batch."""
    logits, ids, mask = _batch("qwen2", 320)   # head wider than the tokenizer's 300 ids
    rows, cols = torch.nonzero(mask, as_tuple=True)
    want = compute_targets(logits, ids, mask, spec, V_TOKENIZER, row_indices=[5, 9, 11], backend=backend)
    flat, labels = logits[rows, cols], ids[rows, cols + 1]
    u = (position_uniforms(spec, [5, 9, 11], rows, cols, ids.shape[1], torch.device("cpu"))
         if spec.kind == "sample" else None)
    parts = [position_targets(flat[a:a + 7], labels[a:a + 7], spec, V_TOKENIZER,
                              None if u is None else u[a:a + 7], backend) for a in range(0, len(rows), 7)]
    got = join_targets(parts, spec)
    assert len(got.label_logprob) == int(mask.sum()) > 20
    for name in ("target_offsets", "target_ids", "target_counts", "target_logprobs", "label_logprob",
                 "rest_mass", "entropy"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
        elif name in ("target_offsets", "target_ids", "target_counts"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-6, err_msg=name)
