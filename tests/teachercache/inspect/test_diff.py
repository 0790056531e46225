"""`teachercache diff`: KL(A||B) per position against a dense reference over the full vocabulary (each
cache's rest mass spread evenly over its unstored ids, then coarsened onto the union of stored ids plus
one bucket), the summary and worst rows, and the refusal of caches over different rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_cache

from teachercache.cli import main
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.cache import Cache
from teachercache.inspect.diff import DiffError, diff_caches
from teachercache.inspect.rows import iter_cache_rows

V = 50
LAYOUT = S.Layout(vocab_size=V)


def _batch(input_ids, mask, dists, pick):
    """A RowBatch (one row) whose position j stores the ids pick(j) of the dense distribution dists[j]."""
    ids, lps, sizes = [], [], []
    for j, d in enumerate(dists):
        chosen = np.asarray(pick(j, d))
        ids.append(chosen)
        lps.append(np.log(d[chosen]))
        sizes.append(len(chosen))
    rest = np.array([1 - dists[j][ids[j]].sum() for j in range(len(dists))])
    return RowBatch(row_offsets=np.array([0, len(input_ids)]), input_ids=input_ids, target_mask=mask,
                    target_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                    target_ids=np.concatenate(ids).astype(np.int32),
                    target_logprobs=np.concatenate(lps).astype(np.float32), label_logprob=np.full(len(dists), -1.0, np.float32),
                    rest_mass=rest.astype(np.float32), entropy=np.ones(len(dists), np.float32))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("diff")
    a_batches, b_batches = [], []
    for _ in range(3):
        T = 24
        input_ids = rng.integers(0, V, T).astype(np.int32)
        mask = np.arange(T) < T - 1
        dist_a = rng.dirichlet(np.full(V, 0.3), T - 1)
        dist_b = 0.7 * dist_a + 0.3 * rng.dirichlet(np.full(V, 0.3), T - 1)
        a_batches.append(_batch(input_ids, mask, dist_a, lambda j, d: np.argsort(-d)[:12]))
        b_batches.append(_batch(input_ids, mask, dist_b, lambda j, d: rng.choice(V, 6, replace=False)))
    write_cache(root / "a", a_batches, LAYOUT)
    write_cache(root / "b", b_batches, LAYOUT)
    return root / "a", root / "b"


def _reference_kl(ra, rb, j):
    """Dense: each cache's full-vocabulary distribution (rest spread evenly over its unstored ids), both
    coarsened onto the union of their stored ids plus one bucket, renormalised, then KL."""
    def full(row):
        e = row.entries(j)
        p = np.full(V, row.rest_mass[j] / (V - (e.stop - e.start)))
        p[row.ids[e]] = np.exp(row.logprobs[e].astype(np.float64))
        return p, set(row.ids[e].tolist())

    pa, sa = full(ra)
    pb, sb = full(rb)
    union = sorted(sa | sb)
    outside = [i for i in range(V) if i not in sa | sb]
    ca = np.append(pa[union], pa[outside].sum())
    cb = np.append(pb[union], pb[outside].sum())
    ca, cb = ca / ca.sum(), cb / cb.sum()
    return float(sum(x * np.log(x / y) for x, y in zip(ca, cb) if x > 0))


def test_kl_matches_a_dense_reference(caches):
    a, b = caches
    report = diff_caches(a, b)
    want = []
    per_row = []
    for ra, rb in zip(iter_cache_rows(Cache.open(a)), iter_cache_rows(Cache.open(b))):
        row_kl = [_reference_kl(ra, rb, j) for j in range(len(ra.positions))]
        want += row_kl
        per_row.append((np.mean(row_kl), ra.index))
    want = np.array(want)
    k = report["kl"]
    assert k["positions"] == len(want) == 69
    assert k["mean"] == pytest.approx(want.mean(), rel=1e-6)
    assert k["max"] == pytest.approx(want.max(), rel=1e-6)
    ranked = np.sort(want)
    for q in (0.5, 0.99):  # a streaming histogram's quantile: between the order statistics around q*n, to 1%
        i = int(q * len(want))
        assert ranked[i - 1] * 0.99 <= k[f"p{q * 100:g}"] <= ranked[min(i, len(want) - 1)] * 1.01
    assert [w["row"] for w in report["worst_rows"]] == [r for _, r in sorted(per_row, reverse=True)]
    assert report["worst_rows"][0]["mean_kl"] == pytest.approx(max(per_row)[0], rel=1e-6)
    assert diff_caches(a, a)["kl"]["max"] == 0.0

    out = CliRunner().invoke(main, ["diff", str(a), str(b), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["kl"]["mean"] == pytest.approx(k["mean"])
    text = CliRunner().invoke(main, ["diff", str(a), str(b)]).output
    assert "KL nats   mean" in text


def test_caches_over_different_rows_are_refused(caches, tmp_path):
    a, _ = caches
    rng = np.random.default_rng(9)
    other = []
    for _ in range(3):
        ids = rng.integers(0, V, 24).astype(np.int32)
        other.append(_batch(ids, np.arange(24) < 23, rng.dirichlet(np.ones(V), 23), lambda j, d: [0, 1]))
    write_cache(tmp_path / "o", other, LAYOUT)
    with pytest.raises(DiffError, match="row 0: input_ids differ"):
        diff_caches(a, tmp_path / "o")
    result = CliRunner().invoke(main, ["diff", str(a), str(tmp_path / "o")])
    assert result.exit_code == 1 and "same rows" in result.output
