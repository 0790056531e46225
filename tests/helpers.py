"""Shared test helpers: random but teacher-like RowBatches, small real caches written to disk, sparse KD cases."""

from __future__ import annotations

import numpy as np
import torch

from student.losses import SparseTargets
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.cache import CacheWriter
from teachercache.format.manifest import DataInfo, TargetSpec, TeacherInfo, TokenizerInfo


def random_batch(rng: np.random.Generator, layout: S.Layout, row_lengths, k: int | None = 8,
                 mask_prob: float = 0.9) -> RowBatch:
    """Rows of random tokens with top-k (k given) or adaptive-k/sampled (k None) targets drawn from a
    peaked random distribution over layout.vocab_size ids."""
    V = layout.vocab_size
    row_offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
    T = int(row_offsets[-1])
    mask = rng.random(T) < mask_prob
    P = int(mask.sum())
    sizes = np.full(P, min(k, V)) if k is not None else rng.integers(1, min(V, 40) + 1, P)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ids, lps, counts = [], [], []
    for n in sizes:
        chosen = rng.choice(V, size=n, replace=False)
        logits = rng.standard_normal(n) * 4 + np.where(np.arange(n) == 0, 6, 0)
        lp = logits - np.log(np.exp(logits).sum() * (1 + rng.random()))  # leave some rest mass
        ids.append(chosen)
        lps.append(lp)
        counts.append(rng.integers(1, 9, n))
    ids = np.concatenate(ids).astype(np.int32) if P else np.zeros(0, np.int32)
    lps = np.concatenate(lps).astype(np.float32) if P else np.zeros(0, np.float32)
    rest = np.array([max(0.0, 1 - np.exp(lps[a:b].astype(np.float64)).sum()) for a, b in zip(offsets, offsets[1:])])
    batch = RowBatch(
        row_offsets=row_offsets, input_ids=rng.integers(0, V, T).astype(np.int32), target_mask=mask,
        target_offsets=offsets, target_ids=ids, target_logprobs=lps,
        target_counts=np.concatenate(counts).astype(np.int32) if (layout.sampled and P) else
        (np.zeros(0, np.int32) if layout.sampled else None),
        label_logprob=-rng.random(P).astype(np.float32) * 12, rest_mass=rest.astype(np.float32),
        entropy=rng.random(P).astype(np.float32) * 5)
    batch.hidden = {layer: rng.standard_normal((P, layout.hidden_width)).astype(np.float32)
                    for layer in layout.hidden_layers}
    return batch


def write_cache(path, batches, layout: S.Layout, shard_bytes: int = 1 << 30):
    """Write a complete cache (shards + manifest) of the given RowBatches; returns the Manifest."""
    with CacheWriter(path, layout, shard_bytes=shard_bytes) as writer:
        for batch in batches:
            writer.write(batch)
        return writer.finish(
            targets=TargetSpec(kind="sample" if layout.sampled else "topk", k=None if layout.sampled else 8,
                               samples=64 if layout.sampled else None, seed=0 if layout.sampled else None),
            teacher=TeacherInfo(name_or_path="test-teacher", config_sha256="0" * 64, dtype="float32",
                                output_size=layout.vocab_size),
            tokenizer=TokenizerInfo(fingerprint="f" * 64, vocab_size=layout.vocab_size),
            data=DataInfo(sources=["test"], fingerprint="d" * 64, seq_len=16, packing="concat",
                          documents_read=3, documents_used=3))


def sparse_case(seed: int, n: int = 10, vocab: int = 37, max_k: int = 6, adversarial: bool = False):
    """Random logits and sparse targets; adversarial adds k=1, rest 0 and 1, -inf log-probs, id V-1,
    unsorted ids, masked positions and a label of -100."""
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, 3, (n, vocab)), dtype=torch.float32)
    sizes = rng.integers(0, max_k + 1, n)
    if adversarial:
        sizes[0], sizes[1], sizes[2], sizes[3] = 1, 3, 4, max_k
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids, logprobs, counts, rest = [], [], [], []
    for i, k in enumerate(sizes):
        teacher = torch.log_softmax(torch.tensor(rng.normal(0, 3, vocab)), -1).numpy()
        chosen = rng.permutation(vocab)[:k]                   # distinct, unsorted
        lp = teacher[chosen]
        r = max(0.0, 1.0 - float(np.exp(lp).sum()))
        if adversarial and i == 1:
            chosen[0] = vocab - 1
            lp = np.log(np.array([0.5, 0.3, 0.2]))
            r = 0.0                                           # all the mass stored
        if adversarial and i == 2:
            lp[1] = -np.inf                                   # an entry with p = 0
            r = 1.0 - float(np.exp(lp).sum())
        if adversarial and i == 0:
            lp = np.array([-30.0])
            r = 1.0                                           # nearly all mass outside
        ids.append(chosen)
        logprobs.append(lp)
        counts.append(rng.integers(1, 9, k))
        rest.append(r)
    labels = torch.tensor(rng.integers(0, vocab, n))
    weights = torch.tensor(rng.uniform(0.2, 1.0, n))
    if adversarial:
        labels[4] = -100
        weights[5] = 0.0                                      # masked out
        labels[6] = vocab - 1
    targets = SparseTargets(torch.tensor(offsets, dtype=torch.int64),
                            torch.tensor(np.concatenate(ids), dtype=torch.int64),
                            torch.tensor(np.concatenate(logprobs), dtype=torch.float32),
                            torch.tensor(rest, dtype=torch.float32),
                            torch.tensor(np.concatenate(counts), dtype=torch.float32))
    return logits, targets, labels, weights
