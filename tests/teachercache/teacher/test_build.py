"""The teacher pass end to end, on CPU: a tiny real Llama built from a config with the demo tokenizer.
The cache's targets equal a direct computation, sampled targets do not depend on batching, and a build
killed with SIGKILL resumes into the same shards as one that never stopped."""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.inspect.verify import verify_cache
from teachercache.teacher.build import BuildError, BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions, DocumentCounts, iter_packed_rows
from teachercache.teacher.targets import compute_targets

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Llama over the demo tokenizer's 8192 ids, with 8 padding output columns."""
    path = tmp_path_factory.mktemp("teacher")
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "teacher")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _options(teacher, out, **kw):
    data = DataOptions(paths=(str(CORPUS),), seq_len=kw.pop("seq_len", 48), max_docs=kw.pop("max_docs", 2))
    return BuildOptions(teacher=str(teacher), data=data, out=str(out), progress=False, **kw)


def test_build_writes_a_verified_cache_whose_targets_equal_a_direct_computation(teacher, tmp_path):
    opts = _options(teacher, tmp_path / "c", batch_size=3, shard_bytes=20_000, hidden_layers=(1,),
                    targets=TargetSpec(kind="topk", k=8))
    result = build_cache(opts)
    assert verify_cache(tmp_path / "c") == []
    cache = Cache.open(tmp_path / "c")
    m = cache.manifest
    assert len(m.shards) > 1 and m.totals.rows == result.rows
    assert m.data.documents_read == 2 and m.data.documents_used == 2 and m.layout.vocab_size == 8192
    assert m.teacher.output_size == 8200 and m.layout.hidden_layers == (1,)
    assert AutoTokenizer.from_pretrained(tmp_path / "c" / "tokenizer").get_vocab() == \
        AutoTokenizer.from_pretrained(teacher).get_vocab()

    tok = AutoTokenizer.from_pretrained(teacher)
    model = LlamaForCausalLM.from_pretrained(teacher).eval()
    rows = list(iter_packed_rows(opts.data, tok, DocumentCounts()))
    got = [b for b in cache.iter_batches()]
    got_ids = np.concatenate([b.input_ids for b in got])
    assert got_ids.tolist() == np.concatenate([r.input_ids for r in rows]).tolist()
    i = 0
    for batch in got:
        for b in range(batch.num_rows):
            row = rows[i]
            ids = torch.from_numpy(row.input_ids.astype(np.int64))[None]
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            want = compute_targets(out.logits, ids, torch.from_numpy(row.target_mask)[None], opts.targets, 8192)
            p0, p1 = batch.row_positions[b], batch.row_positions[b + 1]
            for p in range(p0, p1):
                w = slice(want.target_offsets[p - p0], want.target_offsets[p - p0 + 1])
                g = slice(batch.target_offsets[p], batch.target_offsets[p + 1])
                assert sorted(batch.target_ids[g].tolist()) == sorted(want.target_ids[w].tolist())
                assert np.abs(np.sort(batch.target_logprobs[g]) - np.sort(want.target_logprobs[w])).max() <= 0.02
            np.testing.assert_allclose(batch.rest_mass[p0:p1], want.rest_mass, atol=1e-4)
            np.testing.assert_allclose(batch.label_logprob[p0:p1], want.label_logprob, atol=1e-3)
            h = out.hidden_states[1][0][torch.from_numpy(row.target_mask)].numpy()
            np.testing.assert_allclose(batch.hidden[1][p0:p1], h, rtol=2**-7, atol=1e-5)
            i += 1
    assert i == len(rows)


def test_sampled_build_does_not_depend_on_batch_size(teacher, tmp_path):
    spec = TargetSpec(kind="sample", k=None, samples=32, seed=3)
    for bs in (1, 4):
        build_cache(_options(teacher, tmp_path / f"b{bs}", batch_size=bs, targets=spec))
    a, b = (list(Cache.open(tmp_path / f"b{bs}").iter_batches()) for bs in (1, 4))
    for name in ("target_ids", "target_counts", "target_logprobs"):
        np.testing.assert_array_equal(np.concatenate([getattr(x, name) for x in a]),
                                      np.concatenate([getattr(x, name) for x in b]))


def test_refusals(teacher, tmp_path):
    build_cache(_options(teacher, tmp_path / "c"))
    with pytest.raises(BuildError, match="not empty; add --resume"):
        build_cache(_options(teacher, tmp_path / "c"))
    with pytest.raises(BuildError, match="already complete"):
        build_cache(_options(teacher, tmp_path / "c", resume=True))
    build_cache(_options(teacher, tmp_path / "c", overwrite=True, max_docs=1))
    assert Cache.open(tmp_path / "c").manifest.data.documents_read == 1
    with pytest.raises(BuildError, match="max_position_embeddings 128"):
        build_cache(_options(teacher, tmp_path / "d", seq_len=256))
    with pytest.raises(BuildError, match="--hidden-layers 3"):
        build_cache(_options(teacher, tmp_path / "d", hidden_layers=(3,)))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"body": "x"}\n')
    with pytest.raises(BuildError, match=r"no rows \(2 documents read, skipped: \{'empty': 1, 'missing field': 1\}\)"):
        build_cache(BuildOptions(teacher=str(teacher), out=str(tmp_path / "f"), progress=False,
                                 data=DataOptions(paths=(str(tmp_path / "empty.jsonl"),), seq_len=48)))
    assert not (tmp_path / "f" / "manifest.json").exists()
    with pytest.raises(BuildError, match="no such directory"):
        build_cache(_options(tmp_path / "missing", tmp_path / "d"))
    (tmp_path / "e" / "state").mkdir(parents=True)
    with open(tmp_path / "e" / "state" / "rank-000.lock", "w") as held:  # a build already running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BuildError, match="another build"):
            build_cache(_options(teacher, tmp_path / "e", resume=True))


KILLED_BUILD = """
import sys
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions
build_cache(BuildOptions(teacher=sys.argv[1], out=sys.argv[2], batch_size=2, shard_bytes=8000,
                         data=DataOptions(paths=(sys.argv[3],), seq_len=48, max_docs=3),
                         resume=len(sys.argv) > 4, progress=False))
"""


def test_killed_build_resumes_to_the_same_cache(teacher, tmp_path):
    args = [sys.executable, "-c", KILLED_BUILD, str(teacher)]
    subprocess.run(args + [str(tmp_path / "whole"), str(CORPUS)], check=True)
    proc = subprocess.Popen(args + [str(tmp_path / "cut"), str(CORPUS)])
    state = tmp_path / "cut" / "state" / "rank-000.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "manifest.json").exists()
    subprocess.run(args + [str(tmp_path / "cut"), str(CORPUS), "resume"], check=True)
    whole, cut = Cache.open(tmp_path / "whole").manifest, Cache.open(tmp_path / "cut").manifest
    assert [(s.file, s.sha256) for s in whole.shards] == [(s.file, s.sha256) for s in cut.shards]
    assert whole.totals == cut.totals and whole.data == cut.data
    assert verify_cache(tmp_path / "cut") == []


def _rows_of(path):
    """{row tokens: per-position (ids, counts)} of a cache, order-free."""
    out = {}
    for b in Cache.open(path).iter_batches():
        for r in range(b.num_rows):
            ps = range(b.row_positions[r], b.row_positions[r + 1])
            out[tuple(b.input_ids[b.row_offsets[r]:b.row_offsets[r + 1]].tolist())] = [
                (b.target_ids[b.target_offsets[p]:b.target_offsets[p + 1]].tolist(),
                 b.target_counts[b.target_offsets[p]:b.target_offsets[p + 1]].tolist()) for p in ps]
    return out


def test_torchrun_two_ranks_equal_one_process(teacher, tmp_path):
    flags = ["--teacher", str(teacher), "--data", str(CORPUS), "--seq-len", "48", "--batch-size", "2",
             "--max-docs", "2", "--target", "sample", "--samples", "16", "--seed", "7", "--no-progress"]
    subprocess.run([sys.executable, "-m", "teachercache", "build", "--out", str(tmp_path / "one"), *flags],
                   check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "teachercache",
                    "build", "--out", str(tmp_path / "two"), *flags], check=True)
    two = Cache.open(tmp_path / "two").manifest
    assert {s.file.split("-")[1] for s in two.shards} == {"r000", "r001"}  # each rank wrote its own shards
    assert verify_cache(tmp_path / "two") == []
    assert _rows_of(tmp_path / "one") == _rows_of(tmp_path / "two")
    assert two.data == Cache.open(tmp_path / "one").manifest.data


def test_a_pass_that_fails_resumes_to_the_same_cache(teacher, tmp_path, monkeypatch):
    import teachercache.teacher.build as build_module

    opts = dict(batch_size=2, shard_bytes=25_000, max_docs=3)  # shards of two to three batches
    build_cache(_options(teacher, tmp_path / "whole", **opts))
    real, calls = build_module._forward, {"n": 0}

    def fails_at_the_sixth_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "_forward", fails_at_the_sixth_batch)
    with pytest.raises(RuntimeError, match="device lost"):
        build_cache(_options(teacher, tmp_path / "cut", **opts))
    monkeypatch.undo()
    assert not list((tmp_path / "cut" / "shards").glob("*.partial-*"))  # the open shard was dropped
    build_cache(_options(teacher, tmp_path / "cut", resume=True, **opts))
    whole, cut = Cache.open(tmp_path / "whole").manifest, Cache.open(tmp_path / "cut").manifest
    assert [(s.file, s.sha256) for s in whole.shards] == [(s.file, s.sha256) for s in cut.shards]


def test_head_over_chunks_of_positions_gives_the_whole_forwards_cache(teacher, tmp_path, capfd):
    """--head-chunk 7 (the LM head over many small chunks of target positions, hidden states by hooks) against
    --head-chunk 0 (the model's whole forward, output_hidden_states): the same targets and hidden states, to
    the rounding of another matmul kernel (chunks of 7 rows; at the default 1,024 the demo teacher's caches
    are byte for byte the same, docs/build.md)."""
    for name, spec in (("topk", TargetSpec(kind="topk", k=8)), ("sample", TargetSpec(kind="sample", samples=16, seed=1))):
        for chunk in (7, 0):
            build_cache(_options(teacher, tmp_path / f"{name}{chunk}", batch_size=3, head_chunk=chunk, targets=spec,
                                 hidden_layers=(0, 1, 2) if name == "topk" else ()))
        assert "runs over the whole batch" not in capfd.readouterr().err   # the split was taken, silently
        a, b = (list(Cache.open(tmp_path / f"{name}{c}").iter_batches()) for c in (7, 0))
        cat = lambda batches, field: np.concatenate([getattr(x, field) for x in batches])  # noqa: E731
        for field in ("input_ids", "target_offsets") + (("target_ids",) if name == "topk" else ()):
            np.testing.assert_array_equal(cat(a, field), cat(b, field), err_msg=field)
        if name == "sample":   # a draw that falls within float32 rounding of a bucket edge may go either way
            for field in ("target_ids", "target_counts"):
                assert np.mean(cat(a, field) == cat(b, field)) > 0.99, field
        lp_a, lp_b = cat(a, "target_logprobs"), cat(b, "target_logprobs")
        assert np.mean(lp_a == lp_b) > 0.99
        if name == "topk":
            assert np.abs(lp_a - lp_b).max() <= 0.02   # a flip of the quantiser's rounding at most
        for field in ("label_logprob", "rest_mass", "entropy"):
            np.testing.assert_allclose(cat(a, field), cat(b, field), atol=1e-3, err_msg=field)   # quantised
        if name == "topk":
            for layer in (0, 1, 2):
                np.testing.assert_allclose(np.concatenate([x.hidden[layer] for x in a]),
                                           np.concatenate([x.hidden[layer] for x in b]), rtol=1e-5, atol=1e-6)


def test_split_head_check_catches_a_transform_it_does_not_apply():
    """SplitHead.check compares body -> head -> transforms with the model's own forward: a Cohere model
    (logit_scale 0.25) splits cleanly with its transform and is caught without it."""
    from transformers import CohereConfig, CohereForCausalLM

    from teachercache.teacher.head import split_head

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25)).eval()
    ids = torch.randint(0, 300, (1, 20))
    split, why = split_head(model)
    assert why == "" and split.transforms == {"logit_scale": 0.25} and len(split.layers) == 2
    assert split.check(model, ids) is None
    split.transforms = {}
    assert "differ from the model's" in split.check(model, ids)


def test_device_map_with_layers_offloaded_to_disk_gives_the_same_cache(tmp_path):
    """--device-map auto with a --max-memory too small for the demo teacher (21 MB in float32): accelerate keeps
    the embeddings in CPU memory and reads the decoder layers and the head from disk (out/state/offload) as
    they run; the cache equals a plain build's, and the offloaded weights are gone afterwards."""
    from transformers import AutoModelForCausalLM

    demo = ROOT / "data" / "teacher"
    placed = AutoModelForCausalLM.from_pretrained(demo, device_map="auto", max_memory={"cpu": "18MB"},
                                                  offload_folder=str(tmp_path / "probe"))
    assert set(placed.hf_device_map.values()) == {"cpu", "disk"}, placed.hf_device_map   # really split
    del placed
    build_cache(_options(demo, tmp_path / "plain", batch_size=3, hidden_layers=(1,)))
    build_cache(_options(demo, tmp_path / "mapped", batch_size=3, hidden_layers=(1,), device_map="auto",
                         max_memory="cpu=18MB"))
    plain, mapped = Cache.open(tmp_path / "plain"), Cache.open(tmp_path / "mapped")
    assert [s.sha256 for s in plain.manifest.shards] == [s.sha256 for s in mapped.manifest.shards]
    assert not (tmp_path / "mapped" / "state" / "offload").exists()
    assert verify_cache(tmp_path / "mapped") == []


def test_device_map_refusals(teacher, tmp_path):
    with pytest.raises(BuildError, match="--device-map 'gpu-first': choose one of auto"):
        _options(teacher, tmp_path / "a", device_map="gpu-first")
    with pytest.raises(BuildError, match="give --device-map auto as well"):
        _options(teacher, tmp_path / "b", max_memory="cpu=1GiB")
    with pytest.raises(BuildError, match="DEVICE=SIZE pairs"):
        _options(teacher, tmp_path / "c", device_map="auto", max_memory="lots")


def _topk_rows(path):
    """{row tokens: [(stored ids, their log-probs)] per target position} of a top-k cache, order-free."""
    out = {}
    for b in Cache.open(path).iter_batches():
        for r in range(b.num_rows):
            ps = range(b.row_positions[r], b.row_positions[r + 1])
            out[tuple(b.input_ids[b.row_offsets[r]:b.row_offsets[r + 1]].tolist())] = [
                (b.target_ids[b.target_offsets[p]:b.target_offsets[p + 1]].tolist(),
                 b.target_logprobs[b.target_offsets[p]:b.target_offsets[p + 1]]) for p in ps]
    return out


@pytest.mark.parametrize("procs", [4])
def test_tensor_parallel_groups_under_torchrun_equal_one_process(teacher, tmp_path, procs):
    """--tp-size 2 under torchrun (gloo on CPU): each pair of ranks holds the teacher split by transformers'
    tensor-parallel plan; with 4 ranks, two such groups share out the rows. The cache holds the rows of a
    one-process build with the same targets (ids equal, log-probs to the quantiser's step: the sharded
    matmuls round differently), one writer per group."""
    flags = ["--teacher", str(teacher), "--data", str(CORPUS), "--seq-len", "48", "--batch-size", "2",
             "--max-docs", "2", "--k", "8", "--no-progress"]
    subprocess.run([sys.executable, "-m", "teachercache", "build", "--out", str(tmp_path / "one"), *flags], check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m",
                    "teachercache", "build", "--out", str(tmp_path / "tp"), "--tp-size", "2", *flags], check=True)
    tp = Cache.open(tmp_path / "tp").manifest
    assert {s.file.split("-")[1] for s in tp.shards} == {f"r{g:03d}" for g in range(procs // 2)}
    assert tp.extra["tp_size"] == 2 and tp.extra["world_size"] == procs // 2
    assert verify_cache(tmp_path / "tp") == []
    one, two = _topk_rows(tmp_path / "one"), _topk_rows(tmp_path / "tp")
    assert one.keys() == two.keys() and len(one) > 3
    for row in one:
        for (ids_a, lp_a), (ids_b, lp_b) in zip(one[row], two[row]):
            assert ids_a == ids_b
            assert np.abs(lp_a - lp_b).max() <= 0.02
