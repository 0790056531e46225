"""`teachercache inspect` distributions (captured mass, entropy, ids per position, rank of the actual next
token, per shard) against plain numpy over the values written; `teachercache plot` draws them."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import random_batch, write_cache

from teachercache.cli import main
from teachercache.format import schema as S
from teachercache.inspect.plot import FIGURES
from teachercache.inspect.report import Histogram, inspect_cache


def _written(batches):
    """Per position, from the RowBatches before encoding: captured, entropy, size, rank of the next token."""
    cap, ent, size, rank = [], [], [], []
    for b in batches:
        tok = np.flatnonzero(b.target_mask)
        for p, t in enumerate(tok):
            ids = b.target_ids[b.target_offsets[p]:b.target_offsets[p + 1]]
            lps = b.target_logprobs[b.target_offsets[p]:b.target_offsets[p + 1]]
            row_end = b.row_offsets[np.searchsorted(b.row_offsets, t, "right")]
            nxt = b.input_ids[t + 1] if t + 1 < row_end else -1
            order = np.argsort(-lps, kind="stable")
            hit = np.flatnonzero(ids[order] == nxt)
            cap.append(1 - b.rest_mass[p])
            ent.append(b.entropy[p])
            size.append(len(ids))
            rank.append(hit[0] + 1 if len(hit) else 0)
    return np.array(cap), np.array(ent), np.array(size), np.array(rank)


def test_distributions_match_the_values_written(tmp_path):
    rng = np.random.default_rng(4)
    layout = S.Layout(vocab_size=30)  # a small vocabulary: the next token is often stored
    batches = [random_batch(rng, layout, [40, 25], k=None) for _ in range(4)]
    manifest = write_cache(tmp_path / "c", batches, layout, shard_bytes=3000)
    report = inspect_cache(tmp_path / "c")
    cap, ent, size, rank = _written(batches)
    c, h, k, lab = report["captured_mass"], report["entropy"], report["ids_per_position"], report["label"]
    assert c["count"] == h["count"] == k["count"] == len(cap)
    assert c["mean"] == pytest.approx(cap.mean(), abs=2e-5) and c["min"] == pytest.approx(cap.min(), abs=2e-5)
    assert h["mean"] == pytest.approx(ent.mean(), abs=1e-3) and h["max"] == pytest.approx(ent.max(), abs=1e-3)
    assert abs(c["p50"] - np.median(cap)) <= 0.01 and abs(h["p90"] - np.quantile(ent, 0.9)) <= 0.1
    assert k["counts"] == {int(v): int(n) for v, n in zip(*np.unique(size, return_counts=True))}
    assert k["p50"] == int(np.sort(size)[int(np.ceil(0.5 * len(size))) - 1])
    assert lab["in_set_share"] == pytest.approx((rank > 0).mean()) and 0.1 < lab["in_set_share"] < 0.9
    ranks = lab["rank_in_set"]["counts"]
    # ranks follow stored (quantised) order: compare as counts with a small allowance for quantised ties
    assert sum(ranks.values()) == (rank > 0).sum()
    assert abs(lab["rank_in_set"]["mean"] - rank[rank > 0].mean()) < 0.2
    shards = report["per_shard"]
    assert len(shards) == len(manifest.shards) > 1
    assert sum(s["target_positions"] for s in shards) == len(cap)
    assert np.average([s["captured_mass"] for s in shards], weights=[s["target_positions"] for s in shards]) == \
        pytest.approx(cap.mean(), abs=2e-5)
    text = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")]).output
    assert "next token   in the stored set" in text and shards[1]["file"] in text
    as_json = json.loads(CliRunner().invoke(main, ["inspect", "--json", str(tmp_path / "c")]).output)
    assert as_json["label"]["in_set_share"] == pytest.approx(lab["in_set_share"])


def test_histogram_quantiles_are_exact_to_a_bin():
    rng = np.random.default_rng(0)
    values = rng.beta(2, 5, 10_000)
    hist = Histogram(np.linspace(0, 1, 201))
    for chunk in np.array_split(values, 7):
        hist.add(chunk)
    for q in (0.1, 0.5, 0.9, 0.99):
        assert abs(hist.quantile(q) - np.quantile(values, q)) <= 1 / 200
    assert hist.summary()["mean"] == pytest.approx(values.mean())


def test_plot_writes_titled_png_figures(demo_cache, tmp_path):
    result = CliRunner().invoke(main, ["plot", str(demo_cache), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    for name in FIGURES:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (770, 462) and len(data) > 10_000
