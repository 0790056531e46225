"""Export to Axolotl's KD columns and to a Hugging Face datasets directory, checked against the
pyarrow-only decoder of docs/FORMAT.md on a real cache; and a shard opened by pyarrow and by datasets
with no teachercache code. The Axolotl export's extra columns, temperature and variable-k warning (issue 19)
are checked on real top-k, nucleus (built at temperature 1.5) and sampled caches of the demo teacher."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers import random_batch, write_cache

from teachercache.cli import main
from teachercache.errors import OptionError
from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.format.records import decode_batch
from teachercache.interop.export import (PAD_LOGPROB, ExportError, ExportOptions, ExportWarning, export_cache,
                                         export_record)
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions


def test_axolotl_columns_hold_exactly_the_caches_targets(demo_cache, doc_rows, tmp_path):
    out = tmp_path / "kd.parquet"
    result = CliRunner().invoke(main, ["export", str(demo_cache), "--format", "axolotl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs",
                                  "target_mask"]
    raw = export_cache(demo_cache, tmp_path / "raw.parquet", ExportOptions(renormalize=False))
    raw_table = pq.read_table(tmp_path / "raw.parquet")
    refs = doc_rows(demo_cache)
    assert table.num_rows == raw == len(refs) == Cache.open(demo_cache).manifest.totals.rows
    for r, ref in enumerate(refs):
        row = {name: table.column(name)[r].as_py() for name in table.column_names}
        raw_lps = raw_table.column("target_logprobs")[r].as_py()
        T = len(ref["input_ids"])
        assert row["input_ids"] == ref["input_ids"]
        assert len(row["target_token_ids"]) == len(row["target_logprobs"]) == len(row["target_mask"]) == T
        targets = dict(zip(ref["target_positions"], ref["targets"]))
        for t in range(T):
            mask = row["target_mask"][t]
            want_label = ref["input_ids"][t] if t > 0 and (t - 1) in targets else -100
            assert row["labels"][t] == want_label
            if t not in targets:
                assert sum(mask) == 0 and set(row["target_logprobs"][t]) == {PAD_LOGPROB}
                continue
            ids, lps, _ = targets[t]
            n = len(ids)
            assert mask == [1] * n + [0] * (len(mask) - n)
            assert row["target_token_ids"][t][:n] == ids
            renorm = np.asarray(lps) - np.logaddexp.reduce(np.asarray(lps))
            np.testing.assert_allclose(row["target_logprobs"][t][:n], renorm, atol=1e-5)
            assert np.exp(row["target_logprobs"][t][:n]).sum() == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(raw_lps[t][:n], lps, atol=1e-6)
    with pytest.raises(ExportError, match="--overwrite"):
        export_cache(demo_cache, out)


def test_hf_export_is_the_decoded_cache(demo_cache, doc_rows, tmp_path):
    import datasets

    out = tmp_path / "hf"
    result = CliRunner().invoke(main, ["export", str(demo_cache), "--format", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ds = datasets.load_from_disk(str(out))
    refs = doc_rows(demo_cache)
    assert len(ds) == len(refs)
    for row, ref in zip(ds, refs):
        assert row["input_ids"] == ref["input_ids"] and row["positions"] == ref["target_positions"]
        assert row["target_token_ids"] == [ids for ids, _, _ in ref["targets"]]
        for got, (_, lps, _) in zip(row["target_logprobs"], ref["targets"]):
            np.testing.assert_allclose(got, lps, atol=1e-6)
        np.testing.assert_allclose(row["rest_mass"], ref["rest_mass"], atol=1e-6)
        np.testing.assert_allclose(row["label_logprob"], ref["label_logprob"], atol=1e-6)


def test_a_shard_opens_with_pyarrow_alone_and_with_datasets(demo_cache, tmp_path):
    import datasets

    cache = Cache.open(demo_cache)
    path = str(cache.shard_path(0))
    table = ipc.open_stream(pa.memory_map(path)).read_all()  # pyarrow alone
    assert table.num_rows == cache.shards[0].rows
    assert table.column_names == cache.layout.columns()
    sizes = pa.compute.list_flatten(table.column(S.TARGET_SIZES)).to_numpy()
    assert sizes.sum() == cache.shards[0].target_entries
    ds = datasets.Dataset(table)  # the same table as a datasets.Dataset, zero copies of the mapped file
    assert ds.num_rows == table.num_rows and ds[0][S.INPUT_IDS] == table.column(S.INPUT_IDS)[0].as_py()
    # Dataset.from_file memory-maps an Arrow IPC stream, which is what a shard is
    mapped = datasets.Dataset.from_file(path)
    assert mapped.column_names == table.column_names and mapped.num_rows == table.num_rows
    for name in (S.INPUT_IDS, S.TARGET_MASK, S.TARGET_IDS, S.REST_MASS):
        assert mapped[name] == table.column(name).to_pylist()
    # and the decoded targets of a row read through datasets equal the library's own decoding
    with cache.open_shard(0) as reader:
        rows = reader.read_record_batch(0).num_rows
        want = reader.read_batch(0)
    record = pa.RecordBatch.from_pylist(mapped.select(range(rows)).to_list(), schema=cache.layout.schema())
    got = decode_batch(record, cache.layout)
    np.testing.assert_array_equal(got.target_ids, want.target_ids)
    np.testing.assert_array_equal(got.target_logprobs, want.target_logprobs)
    # load_dataset's "arrow" builder falls back to the IPC file reader: shards load as they are
    loaded = datasets.load_dataset("arrow", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.column_names == table.column_names and loaded.num_rows == table.num_rows
    for name in (S.INPUT_IDS, S.TARGET_SIZES, S.REST_MASS):
        assert loaded[name] == table.column(name).to_pylist()


# ---------------------------------------------------------------- Axolotl: columns, temperature, variable k (issue 19)
ROOT = Path(__file__).resolve().parents[3]


def _build(out: Path, targets: TargetSpec) -> Path:
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(out), batch_size=8, progress=False,
                             targets=targets, data=DataOptions(paths=(str(ROOT / "data" / "corpus" / "valid.parquet"),),
                                                               seq_len=64, max_docs=1)))
    return out


@pytest.fixture(scope="module")
def nucleus_cache(tmp_path_factory) -> Path:
    """A real nucleus cache (stored sets of 1..12 ids) built at temperature 1.5. Read it, never modify it."""
    return _build(tmp_path_factory.mktemp("nucleus") / "cache",
                  TargetSpec(kind="nucleus", k=None, top_p=0.8, min_k=1, max_k=12, temperature=1.5))


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory) -> Path:
    """A real sampled cache (16 draws per position). Read it, never modify it."""
    return _build(tmp_path_factory.mktemp("sampled") / "cache",
                  TargetSpec(kind="sample", k=None, samples=16, seed=3))


def stored_sets(cache_dir) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per row, {target position: (stored ids, their full-vocabulary log-probs)} as the cache's reader decodes
    them (not through the export's row iterator)."""
    cache, rows = Cache.open(cache_dir), []
    for i in range(len(cache.shards)):
        with cache.open_shard(i) as reader:
            for batch in reader:
                tok = np.flatnonzero(batch.target_mask)
                row = np.searchsorted(batch.row_offsets, tok, side="right") - 1
                first = len(rows)
                rows.extend({} for _ in range(batch.num_rows))
                for p, (r, t) in enumerate(zip(row, tok)):
                    e = slice(batch.target_offsets[p], batch.target_offsets[p + 1])
                    rows[first + r][int(t - batch.row_offsets[r])] = (batch.target_ids[e], batch.target_logprobs[e])
    return rows


def axolotl_retempered(stored: np.ndarray, t_build: float, t_out: float) -> np.ndarray:
    """Re-tempering written the way Axolotl's dataset loader does it (src/axolotl/integrations/kd/chat_template.py),
    in probabilities: renormalise over the stored ids, raise to T_build / T_out, renormalise, take the log."""
    p = np.exp(np.asarray(stored, np.float64))
    p = p / p.sum()
    q = p ** (t_build / t_out)
    return np.log(q / q.sum())


def _export_cli(cache, out, *args):
    return CliRunner().invoke(main, ["export", str(cache), "--out", str(out), *map(str, args)])


def _rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("which", ["topk", "nucleus"])
def test_attention_mask_and_labels_mark_exactly_the_target_positions(which, demo_cache, nucleus_cache, tmp_path):
    import datasets

    cache = demo_cache if which == "topk" else nucleus_cache
    out = tmp_path / "kd.parquet"
    assert _export_cli(cache, out).exit_code == 0
    rows, refs = _rows(out), stored_sets(cache)
    assert len(rows) == len(refs)
    for row, ref in zip(rows, refs):
        T = len(row["input_ids"])
        assert row["attention_mask"] == [1] * T
        carries = np.asarray([any(m) for m in row["target_mask"]])      # (T,) position t has a target
        assert np.flatnonzero(carries).tolist() == sorted(ref)          # the cache's own target_mask
        labels = np.asarray(row["labels"])
        # Axolotl's loss pairs position t's targets with labels[t + 1] (kernels/liger.py shifts labels by one)
        assert labels[0] == -100 and not carries[-1]
        np.testing.assert_array_equal(labels[1:] != -100, carries[:-1])
        np.testing.assert_array_equal(labels[1:][carries[:-1]], np.asarray(row["input_ids"])[1:][carries[:-1]])
    # loaded the way Axolotl loads a local .parquet path (utils/data/shared.py), it is a Dataset with the three
    # columns that make utils/data/wrappers.py treat it as already tokenized
    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(loaded, datasets.Dataset)
    assert {"input_ids", "attention_mask", "labels"} <= set(loaded.features)
    assert loaded[0]["attention_mask"] == rows[0]["attention_mask"]


@pytest.mark.parametrize("which, t_out", [("topk", 2.0), ("topk", 0.5), ("nucleus", 0.75), ("nucleus", 3.0)])
def test_temperature_re_tempers_the_stored_logprobs(which, t_out, demo_cache, nucleus_cache, tmp_path):
    cache = demo_cache if which == "topk" else nucleus_cache
    t_build = Cache.open(cache).manifest.targets.temperature
    assert t_build == (1.0 if which == "topk" else 1.5)
    out = tmp_path / "kd.parquet"
    result = _export_cli(cache, out, "--temperature", t_out)
    assert result.exit_code == 0, result.output
    assert (f"set kd_temperature: {t_out:g} in the Axolotl config (re-tempered from the cache's build "
            f"temperature {t_build:g})") in result.stderr
    assert export_record(out)["options"]["axolotl"]["config"]["kd_temperature"] == t_out
    assert export_record(out)["options"]["temperature"] == t_out
    checked = 0
    for row, ref in zip(_rows(out), stored_sets(cache)):
        for t, (ids, lps) in ref.items():
            n = len(ids)
            assert row["target_token_ids"][t][:n] == ids.tolist()
            np.testing.assert_allclose(row["target_logprobs"][t][:n], axolotl_retempered(lps, t_build, t_out),
                                       rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == Cache.open(cache).manifest.totals.target_positions


def test_default_keeps_the_build_temperature_and_records_it(nucleus_cache, tmp_path):
    out = tmp_path / "kd.parquet"
    result = _export_cli(nucleus_cache, out)
    assert result.exit_code == 0, result.output
    assert "set kd_temperature: 1.5 in the Axolotl config (the cache's build temperature)" in result.stderr
    assert "kd_temperature" not in result.stdout       # the notes go to stderr, the row count to stdout
    record = export_record(out)["options"]
    assert record["temperature"] is None
    assert record["axolotl"]["config"] == {"kd_temperature": 1.5, "kd_normalize_topk": False}
    assert record["axolotl"]["build_temperature"] == 1.5
    for row, ref in zip(_rows(out), stored_sets(nucleus_cache)):
        for t, (_, lps) in ref.items():          # renormalised over the stored ids, not re-tempered
            np.testing.assert_allclose(row["target_logprobs"][t][:len(lps)], axolotl_retempered(lps, 1.5, 1.5),
                                       rtol=1e-5, atol=1e-5)
    # --temperature equal to the build temperature writes the same file content
    same = tmp_path / "same.parquet"
    assert _export_cli(nucleus_cache, same, "--temperature", 1.5).exit_code == 0
    assert pq.read_table(same).equals(pq.read_table(out))


def test_bad_temperature_combinations_are_refused_before_writing(demo_cache, sampled_cache, tmp_path):
    out = tmp_path / "kd.parquet"
    cases = [
        ((demo_cache, "--temperature", 2, "--no-renormalize"),
         "manifest.json (targets.temperature 1): --temperature 2 with --no-renormalize: re-tempered log-probs are "
         "a distribution only once renormalised over the stored ids; drop --no-renormalize"),
        ((sampled_cache, "--temperature", 2),
         "a sampled cache (targets.kind sample) holds counts of draws made at 1, which cannot be re-tempered to 2; "
         "drop --temperature (and set kd_temperature: 1), or build the cache again with --temperature 2"),
        ((demo_cache, "--format", "hf", "--temperature", 2),
         "--temperature 2 applies to --format axolotl only; the hf export holds the cache's log-probs as stored"),
    ]
    for (cache, *args), message in cases:
        result = _export_cli(cache, out, *args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert not out.exists() and not list(tmp_path.glob(".kd.parquet*"))
    for bad in ("0", "nan", "1e5"):
        result = _export_cli(demo_cache, out, "--temperature", bad)
        assert result.exit_code == 2 and "Invalid value for '--temperature'" in result.output
    with pytest.raises(OptionError, match=r"export: temperature \(--temperature\) must be a finite number"):
        ExportOptions(temperature=-1.0)
    # the library takes any positive temperature (the CLI, a build's range), but never writes -inf log-probs
    with pytest.raises(ExportError, match=r"re-tempered by T_build / T = 1e\+40 do not fit float32"):
        export_cache(demo_cache, out, ExportOptions(temperature=1e-40))
    assert not out.exists() and not list(tmp_path.glob(".kd.parquet*"))
    # the build temperature itself is no re-tempering: accepted with --no-renormalize and on a sampled cache
    raw = tmp_path / "raw.parquet"
    assert _export_cli(demo_cache, raw, "--no-renormalize", "--temperature", 1).exit_code == 0
    assert export_record(raw)["options"]["axolotl"]["config"] == {"kd_temperature": 1.0}
    for row, ref in zip(_rows(raw), stored_sets(demo_cache)):
        for t, (_, lps) in ref.items():
            np.testing.assert_allclose(row["target_logprobs"][t][:len(lps)], lps, atol=1e-6)
    assert _export_cli(sampled_cache, tmp_path / "s.parquet", "--temperature", 1).exit_code == 0


def _every_token_but_the_last(batch, k: int):
    """A RowBatch whose every token carries a k-id target, less each row's last token (which predicts nothing
    in a sound cache)."""
    keep = np.ones(batch.num_tokens, bool)
    keep[batch.row_offsets[1:] - 1] = False
    batch.target_mask = keep
    batch.target_offsets = np.arange(keep.sum() + 1, dtype=np.int64) * k
    batch.target_ids = batch.target_ids.reshape(-1, k)[keep].ravel()
    batch.target_logprobs = batch.target_logprobs.reshape(-1, k)[keep].ravel()
    batch.label_logprob, batch.rest_mass, batch.entropy = (x[keep] for x in (batch.label_logprob, batch.rest_mass,
                                                                            batch.entropy))
    return batch


def test_variable_k_warns_that_kd_normalize_topk_must_stay_off(demo_cache, nucleus_cache, sampled_cache, tmp_path):
    for cache in (nucleus_cache, sampled_cache):
        kind = Cache.open(cache).manifest.targets.kind
        out = tmp_path / f"{kind}.parquet"
        with pytest.warns(ExportWarning, match=rf"targets.kind {kind}: stored sets differ in size .* set "
                                               r"kd_normalize_topk: false"):
            export_cache(cache, out)
        assert export_record(out)["options"]["axolotl"]["config"]["kd_normalize_topk"] is False
        result = _export_cli(cache, tmp_path / f"{kind}-cli.parquet")
        assert result.exit_code == 0
        assert f"warning: targets.kind {kind}: stored sets differ in size" in result.stderr
        assert "Warning" not in result.stderr        # the CLI prints the note once, not Python's warning as well
    # a top-k cache whose sets are shorter than k (as an API import with missing alternatives writes) warns too
    short, layout = tmp_path / "short-cache", S.Layout(vocab_size=300)
    write_cache(short, [_every_token_but_the_last(random_batch(np.random.default_rng(0), layout, [10, 10], k=5,
                                                               mask_prob=1.0), k=5)], layout)
    assert Cache.open(short).manifest.targets.k == 8           # the manifest says top-8, every set holds 5
    with pytest.warns(ExportWarning, match=r"a top-k cache with short stored sets \(\d+ entries over \d+ positions, "
                                           r"k 8\).* set kd_normalize_topk: false"):
        export_cache(short, tmp_path / "short.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        export_cache(demo_cache, tmp_path / "topk.parquet")
    assert export_record(tmp_path / "topk.parquet")["options"]["axolotl"]["config"] == {"kd_temperature": 1.0}
    result = _export_cli(demo_cache, tmp_path / "topk-cli.parquet")
    assert result.exit_code == 0 and "warning" not in result.stderr


def axolotl_topk_kl(logits, ids, logprobs, mask, normalize_topk: bool) -> torch.Tensor:
    """(T,) the KD term of Axolotl's KD trainer per position (it sums them), written from the maths of its source
    (src/axolotl/integrations/kd/kernels/liger.py, distillation_loss_fn with beta 0, before its T^2 factor;
    normalize_logprobs of utils.py): the student's log-softmax gathered at every one of the K slots; with
    normalize_topk, renormalised over all K slots of the position, padded ones included; then only the valid
    slots count, each p_teacher * (log p_teacher - log q_student). logits (T, V); ids, logprobs, mask (T, K)."""
    logq = torch.log_softmax(logits, -1).gather(-1, ids)            # (T, K)
    if normalize_topk:
        logq = logq - torch.logsumexp(logq, -1, keepdim=True)
    valid = mask.bool()
    terms = torch.zeros_like(logq)
    terms[valid] = logprobs[valid].exp() * (logprobs[valid] - logq[valid])
    return terms.sum(-1)


def valid_ids_kl(logits, ids, logprobs, mask, normalize_topk: bool) -> torch.Tensor:
    """(T,) the same KL over each position's valid (stored) ids only: what the normalised top-k loss means."""
    out = torch.zeros(ids.shape[0], dtype=logits.dtype)
    for t in range(ids.shape[0]):
        valid = mask[t].bool()
        if valid.any():
            logq = torch.log_softmax(logits[t], -1)[ids[t][valid]]
            if normalize_topk:
                logq = logq - torch.logsumexp(logq, -1)
            teacher = logprobs[t][valid]
            out[t] = (teacher.exp() * (teacher - logq)).sum()
    return out


def _tensors(row: dict, extra_k: int = 0):
    """(ids, logprobs, mask) of an exported row, padded by extra_k more slots as Axolotl's collator pads a row to
    the batch's longest set (id 0, log-prob -1e9, mask 0; src/axolotl/integrations/kd/collator.py)."""
    T = len(row["target_token_ids"])
    ids = torch.tensor(row["target_token_ids"])
    logprobs = torch.tensor(row["target_logprobs"], dtype=torch.float64)
    mask = torch.tensor(row["target_mask"])
    return (torch.cat([ids, torch.zeros(T, extra_k, dtype=ids.dtype)], 1),
            torch.cat([logprobs, torch.full((T, extra_k), PAD_LOGPROB, dtype=logprobs.dtype)], 1),
            torch.cat([mask, torch.zeros(T, extra_k, dtype=mask.dtype)], 1))


def test_padded_slots_enter_axolotls_normalised_loss_but_not_the_plain_one(demo_cache, nucleus_cache, tmp_path):
    export_cache(demo_cache, tmp_path / "topk.parquet")
    with pytest.warns(ExportWarning):
        export_cache(nucleus_cache, tmp_path / "nucleus.parquet")
    V = Cache.open(nucleus_cache).manifest.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    for name in ("nucleus", "topk"):
        row = _rows(tmp_path / f"{name}.parquet")[0]
        logits = torch.randn(len(row["input_ids"]), V, generator=generator, dtype=torch.float64) * 3
        for extra_k in (0, 5):
            ids, logprobs, mask = _tensors(row, extra_k)
            targets = mask.any(-1)                                      # (T,) positions with a target
            padded = targets & ~mask.bool().all(-1)                     # ... and padded slots among their K
            assert padded.any() == (name == "nucleus" or extra_k > 0)
            # without normalize_topk the padded slots are masked out after the gather: the loss is the valid ids'
            torch.testing.assert_close(axolotl_topk_kl(logits, ids, logprobs, mask, False),
                                       valid_ids_kl(logits, ids, logprobs, mask, False))
            # with it, every position with padded slots gets a different (wrong) value, the others the same
            normalised = axolotl_topk_kl(logits, ids, logprobs, mask, True)
            want = valid_ids_kl(logits, ids, logprobs, mask, True)
            torch.testing.assert_close(normalised[~padded], want[~padded])
            assert ((normalised - want)[padded].abs() > 1e-6).all(), (name, extra_k)
            assert (normalised[padded] > want[padded]).all()   # id 0's mass lowers the valid slots' student log-probs
