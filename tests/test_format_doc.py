"""docs/FORMAT.md is complete enough to decode a shard with pyarrow + numpy alone: run its decoder
against caches the library writes and compare with the library's own decoding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import random_batch, write_cache

from teachercache.format import schema as S
from teachercache.format.cache import Cache

DOC = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def _doc_decoder():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[-1]
    assert "import teachercache" not in code and "from teachercache" not in code
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["decode_shard"]


LAYOUTS = [S.Layout(vocab_size=70_000, format_version=v) for v in (3, 2)] + \
    [S.Layout(vocab_size=300, sampled=True, format_version=v) for v in (3, 2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["v3-topk-3-byte-ids", "v2-topk-3-byte-ids", "v3-sampled",
                                                 "v2-sampled"])
def test_documented_decoder_matches_the_library(tmp_path, layout):
    rng = np.random.default_rng(11)
    batches = [random_batch(rng, layout, [20, 0, 7], k=None if layout.sampled else 12) for _ in range(2)]
    for b in batches:  # few contexts and a small id range: many entries refer to earlier positions
        b.input_ids = rng.integers(0, 3, b.num_tokens).astype(np.int32)
        for p in range(b.num_positions):
            lo, hi = b.target_offsets[p], b.target_offsets[p + 1]
            b.target_ids[lo:hi] = rng.choice(60, hi - lo, replace=False) * (layout.vocab_size // 60)  # over the range
    write_cache(tmp_path / "c", batches, layout)
    with Cache.open(tmp_path / "c").open_shard(0) as reader:
        record = reader.read_record_batch(0)
    hits = np.unpackbits(record.column(S.TARGET_HITS).values.to_numpy())
    ranks = record.column(S.TARGET_REFS).values.to_numpy()
    if layout.format_version == 3:  # ranks follow a selector byte per position; misses use the id table
        positions = len(record.column(S.TARGET_SIZES).values)
        selectors, ranks = ranks[:positions], ranks[positions:]
        assert len(set(selectors.tolist())) >= 3
        assert record.column(S.TARGET_IDS).values.to_numpy()[1] > 0  # a table of ids missed twice or more
    assert hits.mean() > 0.1 and (ranks > 0).mean() > 0.1  # the documented reference scheme is exercised
    cache = Cache.open(tmp_path / "c")
    doc_rows = list(_doc_decoder()(str(cache.shard_path(0))))
    lib = list(cache.iter_batches())
    r = 0
    for batch in lib:
        for b in range(batch.num_rows):
            row = doc_rows[r]
            tok = slice(batch.row_offsets[b], batch.row_offsets[b + 1])
            assert row["input_ids"] == batch.input_ids[tok].tolist()
            assert row["target_positions"] == np.flatnonzero(batch.target_mask[tok]).tolist()
            pos = range(batch.row_positions[b], batch.row_positions[b + 1])
            np.testing.assert_allclose(row["label_logprob"], batch.label_logprob[pos.start:pos.stop], atol=1e-6)
            np.testing.assert_allclose(row["rest_mass"], batch.rest_mass[pos.start:pos.stop], atol=1e-6)
            np.testing.assert_allclose(row["entropy"], batch.entropy[pos.start:pos.stop], atol=1e-6)
            for p, (ids, lps, counts) in zip(pos, row["targets"]):
                sl = slice(batch.target_offsets[p], batch.target_offsets[p + 1])
                assert ids == batch.target_ids[sl].tolist()
                np.testing.assert_allclose(lps, batch.target_logprobs[sl], atol=1e-6)
                if layout.sampled:
                    assert counts == batch.target_counts[sl].tolist()
            r += 1
    assert r == len(doc_rows) == 6
