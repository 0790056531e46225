"""Shared test helpers: random but teacher-like RowBatches, small real caches written to disk, sparse KD cases."""

from __future__ import annotations

import math

import numpy as np
import torch

from teachercache.student.losses import PROB_FLOOR, KDConfig, SparseTargets
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


def dense_reference(logits, targets, labels, weights, cfg: KDConfig):
    """The sparse KD total and its gradient written out position by position in float64: the student's dense
    log_softmax with autograd, the buckets summed from it, the teacher tempered in log space."""
    z = logits.detach().double().requires_grad_(True)
    n, vocab = z.shape
    t, total = cfg.temperature, 0.0
    for i in range(n):
        if weights[i] == 0:
            continue
        a, b = int(targets.offsets[i]), int(targets.offsets[i + 1])
        s = targets.ids[a:b]
        logq = torch.log_softmax(z[i] / t, -1)
        if cfg.loss == "sampled_ce":
            c = targets.counts[a:b].double()
            kd = -(c / c.sum() * logq[s]).sum() if b > a else z.sum() * 0
        else:
            inside = torch.zeros(vocab, dtype=torch.bool)
            inside[s] = True
            # renormalize: the teacher puts nothing in the rest bucket (its stored mass is scaled to 1)
            rest = targets.rest[i:i + 1].double() if cfg.tail == "rest" else torch.zeros(1).double()
            lp = torch.cat([targets.logprobs[a:b].double(), rest.log()]) / t     # p^(1/T), as logs
            # the buckets' log q: logits u of the stored ids and of the rest, normalised with log1p so that a
            # bucket holding nearly all the mass keeps log q = -(the others' share) below float64's epsilon
            u = torch.cat([z[i][s] / t, (z[i][~inside] / t).logsumexp(0)[None]])
            top = int(u.argmax())
            others = torch.cat([u[:top], u[top + 1:]])
            lq = u - u[top] - torch.log1p((others - u[top]).exp().sum())
            if torch.isneginf(lp).all():
                kd = z.sum() * 0
            else:
                lp = torch.log_softmax(lp, 0)
                kd = sum(bucket_term(cfg, lp[j], lq[j]) for j in range(len(lp)))
        ce = -torch.log_softmax(z[i], -1)[labels[i]] if labels[i] >= 0 else 0.0
        total = total + float(weights[i]) * (cfg.ce_weight * ce + cfg.kd_weight * t * t * kd)
    total = total if torch.is_tensor(total) else z.sum() * 0
    total.backward()
    return total.detach(), z.grad


def bucket_term(cfg, lp, lq):
    """One bucket's term of each loss, spelled out from the bucket's log-probabilities lp (teacher) and lq
    (student); m is the loss's mixture."""
    p, q = lp.exp(), lq.exp()

    def mixture(wp, wq):                        # log(wp p + wq q)
        return torch.logsumexp(torch.stack([lp + math.log(wp) if wp else lp * 0 - math.inf,
                                            lq + math.log(wq) if wq else lq * 0 - math.inf]), 0)
    if cfg.loss == "forward_kl":
        return p * (lp - lq) if p > 0 else 0.0
    if cfg.loss == "reverse_kl":
        return q * (lq - torch.clamp(lp, min=math.log(PROB_FLOOR))) if q > 0 else 0.0
    if cfg.loss == "jsd":
        lm = mixture(cfg.beta, 1 - cfg.beta)
        return ((cfg.beta * p * (lp - lm) if p > 0 else 0.0) + ((1 - cfg.beta) * q * (lq - lm) if q > 0 else 0.0))
    if cfg.loss == "tvd":
        return 0.5 * torch.abs(p - q)
    if cfg.loss == "skew_kl":
        return p * (lp - mixture(cfg.alpha, 1 - cfg.alpha)) if p > 0 else 0.0
    if cfg.loss == "skew_reverse_kl":
        return q * (lq - mixture(1 - cfg.alpha, cfg.alpha)) if q > 0 else 0.0
    raise AssertionError(cfg.loss)


def cache_rows(path) -> list[dict]:
    """Every row of a cache in file order: its columns as numpy arrays (``sizes``: ids per target position;
    ``counts`` of sampled caches; ``hidden{layer}`` per stored layer)."""
    from teachercache.format.cache import Cache

    rows = []
    for b in Cache.open(path).iter_batches():
        for r in range(b.num_rows):
            t0, t1 = b.row_offsets[r], b.row_offsets[r + 1]
            p0, p1 = b.row_positions[r], b.row_positions[r + 1]
            e0, e1 = b.target_offsets[p0], b.target_offsets[p1]
            row = {"input_ids": b.input_ids[t0:t1], "target_mask": b.target_mask[t0:t1],
                   "sizes": np.diff(b.target_offsets[p0:p1 + 1]), "ids": b.target_ids[e0:e1],
                   "logprobs": b.target_logprobs[e0:e1], "label": b.label_logprob[p0:p1],
                   "rest": b.rest_mass[p0:p1], "entropy": b.entropy[p0:p1]}
            if b.target_counts is not None:
                row["counts"] = b.target_counts[e0:e1]
            for layer, h in b.hidden.items():
                row[f"hidden{layer}"] = h[p0:p1]
            rows.append(row)
    return rows


def global_row_indices(path) -> list[int]:
    """For each row of a cache that `teachercache build` wrote (file order), its row index g in the one-job,
    one-process build: rank r of w (extra.world_size; the shards' names part-rRRR) holds the rows k of its
    slice i/n (extra.slice; every row without one) with k mod w = r, in order, and row k of slice i is
    g = k n + i."""
    from teachercache.format.cache import Cache

    m = Cache.open(path).manifest
    world, part = m.extra["world_size"], m.extra.get("slice", {"index": 0, "count": 1})
    taken, out = [0] * world, []
    for shard in m.shards:
        rank = int(shard.file.rsplit("part-r", 1)[1][:3])
        for _ in range(shard.rows):
            k = rank + world * taken[rank]
            taken[rank] += 1
            out.append(k * part["count"] + part["index"])
    return out
