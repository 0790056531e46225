"""Benchmark of the cache codec on real teacher distributions: bytes per token, fidelity, decode speed.

The demo teacher in data/ runs over held-out demo text (data/corpus/valid.parquet); its log-probs are
stored at k in {16, 64, 128} and as adaptive-k (nucleus), through the real writer (Arrow IPC + zstd), in
format version 3 (what new caches are written in) and version 2 (still read), then read back and decoded.
Printed side by side, per target position and per token:

  (a) raw fp32 over the full vocabulary;
  (b) naive top-k: int32 ids + fp16 log-probs;
  (c) DistillKit's layout: ids bit-packed at ceil(log2 V) bits, plus its default value bytes
      (16 exact bf16 values + 6 fp32 polynomial terms = 56 bytes per position);
  (d) ours: the target columns (ids, values, hits, refs, sizes), and every column of the cache.

Then the same distributions at a real vocabulary size (--wide-vocab, default 152,064 = Qwen 2's head): every
id, stored and input, mapped through a fixed, seeded permutation of range(152064), so the ids are spread
over the larger range and need 3 bytes, encoded with Layout(vocab_size=152064) and decoded back (the ids,
mapped back by the inverse permutation, must equal the teacher's). A random permutation is the worst case
for the id bytes: real BPE vocabularies give frequent tokens low ids, which this removes.

Fidelity: the largest |decoded - true| log-prob over entries with p >= 1e-4 (and over all entries), and
the largest rest-mass error. Speed, versions 3 and 2 alternated in one process: target positions per
second of one core (the thread's CPU time, so that other jobs on a shared machine do not count) to decode
(the numba kernel alone, and read + zstd decompression + decode from a shard file) and to encode (the
codec alone, and a whole record batch with its Arrow columns). Then the variants the format was chosen
from, at k=64: quantiser steps, zstd levels, zstandard frames instead of Arrow IPC zstd, and the codings
of references, values and ids (version 3's parts one by one).

    python tools/bench_codec.py            # ~3 minutes on 2 CPU cores
    python tools/bench_codec.py --wide-vocab 0     # without the 152k rows
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zstandard

from teachercache.format import codec, codec3, codec3_encode, references
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.cache import Cache, CacheWriter
from teachercache.format.manifest import DataInfo, TargetSpec, TeacherInfo, TokenizerInfo
from teachercache.format.quantizer import quantize_reference
from teachercache.format.records import decode_batch, encode_batch, positions_of_rows, record_streams
from teachercache.format.shards import ZSTD_LEVEL, ShardReader, decoding_columns
from teachercache.inspect.report import column_bytes_estimate

ROOT = Path(__file__).resolve().parents[1]
TARGET_COLUMNS = (S.TARGET_IDS, S.TARGET_VALUES, S.TARGET_HITS, S.TARGET_REFS, S.TARGET_SIZES)
DISTILLKIT_VALUE_BYTES = 16 * 2 + 6 * 4  # 16 exact bf16 log-probs + 6 fp32 polynomial coefficients


# ---------------------------------------------------------------------------------------------------
# Teacher distributions.


def load_rows(teacher_dir: Path, data: Path, seq_len: int, n_rows: int) -> torch.Tensor:
    """(n_rows, seq_len) token ids: the held-out documents joined with EOS, cut into rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    ids: list[int] = []
    for text in pq.read_table(data, columns=["text"]).column("text").to_pylist():
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n_rows * seq_len:
            break
    if len(ids) < n_rows * seq_len:
        n_rows = len(ids) // seq_len
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


@torch.no_grad()
def teacher_tops(teacher_dir: Path, rows: torch.Tensor, max_k: int, chunk: int = 8) -> dict:
    """Per target position (all but each row's last token): the top max_k ids and log-probs (sorted),
    the label log-prob and the entropy, from the full fp32 log-softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    out = {"ids": [], "lps": [], "label": [], "entropy": []}
    for start in range(0, len(rows), chunk):
        x = rows[start:start + chunk]
        lp = torch.log_softmax(model(x).logits[:, :-1].float(), dim=-1)  # (B, S-1, V)
        top = lp.topk(max_k, dim=-1)
        out["ids"].append(top.indices.reshape(-1, max_k))
        out["lps"].append(top.values.reshape(-1, max_k))
        out["label"].append(lp.gather(-1, x[:, 1:, None]).reshape(-1))
        out["entropy"].append(-(lp.exp() * lp).sum(-1).reshape(-1))
    out = {k: torch.cat(v).numpy() for k, v in out.items()}
    out["vocab_size"] = model.config.vocab_size
    return out


def make_batches(rows: torch.Tensor, tops: dict, sizes: np.ndarray, rows_per_batch: int) -> list[RowBatch]:
    """RowBatches storing the first sizes[p] of the sorted top ids at each target position."""
    n_rows, seq_len = rows.shape
    per_row = seq_len - 1
    p64 = tops["lps"].astype(np.float64)
    batches = []
    for r0 in range(0, n_rows, rows_per_batch):
        r1 = min(n_rows, r0 + rows_per_batch)
        pos = slice(r0 * per_row, r1 * per_row)
        n = sizes[pos]
        keep = np.arange(tops["ids"].shape[1])[None, :] < n[:, None]
        rest = 1.0 - np.where(keep, np.exp(p64[pos]), 0.0).sum(1)
        mask = np.ones((r1 - r0, seq_len), bool)
        mask[:, -1] = False
        batches.append(RowBatch(
            row_offsets=np.arange(r1 - r0 + 1, dtype=np.int64) * seq_len,
            input_ids=rows[r0:r1].reshape(-1).numpy().astype(np.int32), target_mask=mask.reshape(-1),
            target_offsets=np.concatenate([[0], np.cumsum(n)]).astype(np.int64),
            target_ids=tops["ids"][pos][keep].astype(np.int32), target_logprobs=tops["lps"][pos][keep],
            label_logprob=tops["label"][pos], rest_mass=np.maximum(rest, 0.0).astype(np.float32),
            entropy=tops["entropy"][pos]))
    return batches


def nucleus_sizes(tops: dict, top_p: float, min_k: int, max_k: int) -> np.ndarray:
    """Smallest n whose mass reaches top_p, clamped to [min_k, max_k]."""
    mass = np.cumsum(np.exp(tops["lps"][:, :max_k].astype(np.float64)), axis=1)
    n = (mass < top_p).sum(1) + 1
    return np.clip(n, min_k, max_k)


def permute_ids(rows: torch.Tensor, tops: dict, vocab_size: int,
                seed: int = 0) -> tuple[torch.Tensor, dict, np.ndarray]:
    """(rows, tops, permutation): every token id of ``rows`` and every id of ``tops`` mapped through a fixed
    permutation of range(vocab_size) (vocab_size >= the teacher's); the distributions themselves unchanged."""
    perm = np.random.default_rng(seed).permutation(vocab_size)
    wide = dict(tops, ids=perm[tops["ids"]], vocab_size=vocab_size)
    return torch.from_numpy(perm[rows.numpy()]), wide, perm


def check_unpermuted(batches: list[RowBatch], cache: Cache, perm: np.ndarray) -> None:
    """The input ids and the decoded target ids of ``cache``, mapped back through the inverse of ``perm``, are
    the teacher's (``batches``: the unpermuted ones); target ids compared per position as sets, since the
    order of tied entries follows the (permuted) ids."""
    inverse = np.argsort(perm)
    for want, got in zip(batches, cache.iter_batches(), strict=True):
        assert np.array_equal(inverse[got.input_ids], want.input_ids)
        assert np.array_equal(got.target_offsets, want.target_offsets)
        pos = np.repeat(np.arange(got.num_positions), got.target_sizes)
        back = inverse[got.target_ids]
        assert np.array_equal(want.target_ids[np.lexsort((want.target_ids, pos))], back[np.lexsort((back, pos))]), \
            "decoded ids differ from the teacher's after the inverse permutation"


# ---------------------------------------------------------------------------------------------------
# Measurements.


def write_cache(path: Path, batches: list[RowBatch], layout: S.Layout, kind: str, zstd_level: int) -> Cache:
    with CacheWriter(path, layout, zstd_level=zstd_level) as writer:
        for b in batches:
            writer.write(b)
        writer.finish(targets=TargetSpec(kind=kind), extra={"bench": True},
                      teacher=TeacherInfo("data/teacher", "-", "float32", layout.vocab_size),
                      tokenizer=TokenizerInfo("-", layout.vocab_size),
                      data=DataInfo(["data/corpus/valid.parquet"], "-", 0, "concat"))
    return Cache.open(path)


def fidelity(batches: list[RowBatch], cache: Cache) -> dict:
    """Largest log-prob error (entries with p >= 1e-4, and all entries) and rest-mass error."""
    err_head = err_all = err_rest = 0.0
    for want, got in zip(batches, cache.iter_batches()):
        # decoded entries come in (descending log-prob, ascending id) order: sort both by (position, id)
        pos_w = np.repeat(np.arange(want.num_positions), want.target_sizes)
        pos_g = np.repeat(np.arange(got.num_positions), got.target_sizes)
        ow = np.lexsort((want.target_ids, pos_w))
        og = np.lexsort((got.target_ids, pos_g))
        assert np.array_equal(want.target_ids[ow], got.target_ids[og])
        lw, lg = want.target_logprobs[ow].astype(np.float64), got.target_logprobs[og].astype(np.float64)
        err = np.abs(np.maximum(lw, -80.0) - lg)
        head = lw >= math.log(1e-4)
        err_head = max(err_head, float(err[head].max(initial=0)))
        err_all = max(err_all, float(err.max(initial=0)))
        err_rest = max(err_rest, float(np.abs(want.rest_mass.astype(np.float64) - got.rest_mass).max()))
    return {"max_err_p_ge_1e-4": err_head, "max_err_all": err_all, "max_rest_err": err_rest}


def _prepared_decodes(cache: Cache) -> tuple[list, int]:
    """The decode_targets arguments of every record batch of ``cache`` (streams read and decompressed)."""
    cols = decoding_columns(cache.layout)
    prepared, positions = [], 0
    for i in range(len(cache.shards)):
        reader = ShardReader(cache.shard_path(i), cache.layout, cols)
        for b in range(reader.num_batches):
            r = reader.read_record_batch(b)
            rows = decode_batch(r.select([S.INPUT_IDS, S.TARGET_MASK, S.TARGET_SIZES]), cache.layout)
            contexts = references.position_contexts(rows.input_ids, rows.target_mask, rows.row_offsets)
            prepared.append((rows.target_sizes.astype(np.uint16), rows.row_positions, contexts,
                             record_streams(r, cache.layout)))
            positions += rows.num_positions
    return prepared, positions


def codec_speed(caches: dict[int, Cache], batches: list[RowBatch], repeats: int) -> dict:
    """Target positions per second of one core, per format version (``caches`` by version, the same
    ``batches``): decode (kernel alone; shard read + decompress + decode) and encode (codec alone; a whole
    record batch with its Arrow columns). Versions alternate pass by pass; the fastest of ``repeats``
    passes counts, timed by the thread's CPU time."""
    numba.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    passes = {}
    for version, cache in caches.items():
        prepared, positions = _prepared_decodes(cache)
        cols = decoding_columns(cache.layout)
        encodes = [(positions_of_rows(b.target_mask, b.row_offsets), b.target_offsets, b.target_ids,
                    b.target_logprobs, b.target_counts,
                    references.position_contexts(b.input_ids, b.target_mask, b.row_offsets)) for b in batches]

        def kernel(prepared=prepared, layout=cache.layout):
            for args in prepared:
                codec.decode_targets(*args, layout)

        def read(cache=cache, cols=cols):
            for i in range(len(cache.shards)):
                with ShardReader(cache.shard_path(i), cache.layout, cols) as reader:
                    for b in range(reader.num_batches):
                        reader.read_batch(b)

        def encode(encodes=encodes, layout=cache.layout):
            for args in encodes:
                codec.encode_targets(*args, layout)

        def encode_record(layout=cache.layout):
            for b in batches:
                encode_batch(b, layout)

        for name, fn in (("decode_kernel", kernel), ("read_decode", read), ("encode_codec", encode),
                         ("encode_record_batch", encode_record)):
            passes[(version, name)] = (fn, positions)
    best = dict.fromkeys(passes, math.inf)
    for fn, _ in passes.values():
        fn()  # compile, warm the page cache
    for _ in range(repeats):
        for key, (fn, _) in passes.items():
            t0 = time.thread_time()
            fn()
            best[key] = min(best[key], time.thread_time() - t0)
    return {f"v{version}": {f"{name}_positions_per_s": passes[(version, name)][1] / best[(version, name)]
                            for (v, name) in passes if v == version} for version in caches}


def zstandard_frame_bytes(cache: Cache, level: int) -> int:
    """Target-column bytes if each column's raw buffers were one zstandard frame per record batch."""
    total, compressor = 0, zstandard.ZstdCompressor(level=level)
    for i in range(len(cache.shards)):
        with ShardReader(cache.shard_path(i), cache.layout, list(TARGET_COLUMNS)) as reader:
            for b in range(reader.num_batches):
                record = reader.read_record_batch(b)
                for name in TARGET_COLUMNS:
                    col = record.column(name)
                    for buf in (col.offsets.buffers()[1], col.values.buffers()[1]):
                        total += len(compressor.compress(buf.to_pybytes()))
    return total


def _varints(values) -> np.ndarray:
    """LEB128 varints of non-negative integers, as bytes."""
    out = bytearray()
    for v in np.asarray(values, np.int64).tolist():
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
    return np.frombuffer(bytes(out), np.uint8)


def _planes(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([((np.asarray(x, np.int64) >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(n)])


def _pair_tokens(deltas: np.ndarray, position: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, escaped deltas) of version 3's value tokens over the entries in the given order: two
    consecutive deltas of the same position and group both below 15 pair up, else one delta per token."""
    tokens, escaped, i, n = [], [], 0, len(deltas)
    d, p, g = deltas.tolist(), position.tolist(), group.tolist()
    while i < n:
        if i + 1 < n and p[i + 1] == p[i] and g[i + 1] == g[i] and d[i] < 15 and d[i + 1] < 15:
            tokens.append(d[i] * 15 + d[i + 1])
            i += 2
            continue
        tokens.append(225 + d[i] if d[i] < 30 else 255)
        if d[i] >= 30:
            escaped.append(d[i])
        i += 1
    return np.asarray(tokens, np.uint8), _varints(escaped)


def coding_variants(batches: list[RowBatch], vocab_size: int, level: int = 1) -> dict:
    """Target bytes/position of the codings the format was chosen from, each stream one zstandard frame per
    record batch (so these rows compare with each other): version 2; version 3 with its references chosen
    from 2, 5 or 8 candidates; version 3's values and ids coded the other ways measured; and two codings
    without references (every id a byte-plane symbol; ids in id order with codes in id order)."""
    zc = zstandard.ZstdCompressor(level=level)
    size = lambda *arrays: sum(len(zc.compress(np.ascontiguousarray(a).tobytes())) for a in arrays)  # noqa
    v2, v3 = S.Layout(vocab_size=vocab_size, format_version=2), S.Layout(vocab_size=vocab_size)
    totals: dict[str, int] = {}

    def add(name, n):
        totals[name] = totals.get(name, 0) + n

    positions = 0
    for b in batches:
        rp = positions_of_rows(b.target_mask, b.row_offsets)
        ctx = references.position_contexts(b.input_ids, b.target_mask, b.row_offsets)
        args = (rp, b.target_offsets, b.target_ids, b.target_logprobs, None, ctx)
        s2 = codec.encode_targets(*args, v2)
        add("version 2 (references, hit bitmap + ranks, varint deltas, id planes)",
            size(s2.ids, s2.values, s2.hits, s2.refs))
        for n in (2, 5, 8):
            s3 = codec3_encode.encode_targets(*args, v3, candidates=n)
            add(f"version 3, references from {n} candidates" + (" (as written)" if n == 8 else ""),
                size(s3.ids, s3.values, s3.hits, s3.refs))
        # version 3's deltas and misses, coded other ways (s3: 8 candidates)
        sizes = np.diff(b.target_offsets)
        _, ids, lps, _ = codec.decode_targets(sizes.astype(np.uint16), rp, ctx, s3, v3)
        codes = quantize_reference(lps, v3.quantizer)
        pos = np.repeat(np.arange(b.num_positions), sizes)
        j = np.arange(len(ids)) - np.repeat(b.target_offsets[:-1], sizes)
        deltas = np.where(j == 0, codes, codes - np.r_[0, codes[:-1]])
        common = (s3.ids, s3.hits, s3.refs)
        add("version 3, values as a varint per delta (version 2's)", size(*common, _varints(deltas)))
        add("version 3, values as pair tokens, positions in order (no groups)",
            size(*common, *_pair_tokens(deltas, pos, np.zeros_like(pos))))
        by_group = np.lexsort((j, pos, j // codec3.GROUP_SIZE))
        singles = np.where(deltas < 30, 225 + deltas, 255).astype(np.uint8)
        add("version 3, values one token per delta, grouped by entry index",
            size(*common, singles[by_group], _varints(deltas[deltas >= 30])))
        hits = np.unpackbits(s3.hits, bitorder="little")[:len(ids)].astype(bool)
        tie = (j > 0) & (deltas == 0)
        symbols = np.where(tie, ids - np.r_[0, ids[:-1]] - 1, ids)[~hits]
        add("version 3, ids as version 2's byte planes (no table)",
            size(s3.values, s3.hits, s3.refs, _planes(symbols, v3.id_bytes)))
        # no references at all: every entry's symbol (tie gap or id) in byte planes; or ids in id order
        all_symbols = np.where(tie, ids - np.r_[0, ids[:-1]] - 1, ids)
        add("no references (every id a byte-plane symbol), version 2 values",
            size(_planes(all_symbols, v3.id_bytes), _varints(deltas)))
        o2 = np.lexsort((ids, pos))
        p2, i2, c2 = pos[o2], ids[o2].astype(np.int64), codes[o2]
        first2 = np.r_[True, p2[1:] != p2[:-1]]
        gaps = np.where(first2, i2, i2 - np.r_[0, i2[:-1]] - 1)
        add("no references, ids in id order (gaps) + codes in id order", size(_planes(gaps, v3.id_bytes),
                                                                             _planes(c2, 2)))
        positions += b.num_positions
    return {k: v / positions for k, v in totals.items()}


def measure(name, batches, layout, kind, workdir, positions, tokens, k_for_baselines=None,
            zstd_level=ZSTD_LEVEL) -> dict:
    cache = write_cache(workdir / name, batches, layout, kind, zstd_level)
    by_col = column_bytes_estimate(cache, sample_batches=10**9, zstd_level=zstd_level)
    target_bytes = sum(by_col[c] for c in TARGET_COLUMNS)
    entries = cache.manifest.totals.target_entries
    res = {"name": name, "mean_k": entries / positions,
           "ours_target_bytes_per_position": target_bytes / positions,
           "ours_all_bytes_per_token": cache.manifest.totals.bytes / tokens,
           "ours_bits_per_entry": 8 * target_bytes / entries,
           "by_column_bytes_per_token": {c: v / tokens for c, v in by_col.items()}}
    if k_for_baselines:
        V = layout.vocab_size
        res["raw_fp32_bytes_per_position"] = 4 * V
        res["naive_bytes_per_position"] = 6 * k_for_baselines
        res["distillkit_bytes_per_position"] = math.ceil(k_for_baselines * math.ceil(math.log2(V)) / 8) \
            + DISTILLKIT_VALUE_BYTES
        res["ratio_vs_distillkit"] = res["ours_target_bytes_per_position"] / res["distillkit_bytes_per_position"]
    res.update(fidelity(batches, cache))
    res["_cache"] = cache
    return res


# ---------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, default=ROOT / "data" / "teacher")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "corpus" / "valid.parquet")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows-per-batch", type=int, default=64,
                    help="rows per Arrow record batch (64 x 256 = 16k positions, as one build batch of 8 x 2048)")
    ap.add_argument("--repeats", type=int, default=10, help="timed decode passes; the fastest counts")
    ap.add_argument("--wide-vocab", type=int, default=152_064,
                    help="also store the top-k runs with the ids permuted over this many (0: skip)")
    args = ap.parse_args()
    torch.manual_seed(0)

    rows = load_rows(args.teacher, args.data, args.seq_len, args.rows)
    tops = teacher_tops(args.teacher, rows, max_k=128)
    positions = len(tops["label"])
    V = tops["vocab_size"]
    print(f"teacher {args.teacher}  V={V}  rows={len(rows)}x{args.seq_len}  target positions={positions}")
    print(f"teacher entropy mean {tops['entropy'].mean():.3f} nats; top-1 p mean "
          f"{np.exp(tops['lps'][:, 0]).mean():.3f}; mass outside top-64 mean "
          f"{1 - np.exp(tops['lps'][:, :64].astype(np.float64)).sum(1).mean():.4f}")

    with tempfile.TemporaryDirectory(prefix="bench_codec_") as tmp:
        run_all(args, rows, tops, Path(tmp))


def run_all(args, rows: torch.Tensor, tops: dict, workdir: Path) -> None:
    positions = len(tops["label"])
    tokens = rows.numel()
    V = tops["vocab_size"]
    layout = S.Layout(vocab_size=V)
    layout2 = S.Layout(vocab_size=V, format_version=2)
    runs, runs2 = [], []
    cases = [(f"top{k}", np.full(positions, k), "topk", k) for k in (16, 64, 128)] + \
        [(f"nucleus{p}", nucleus_sizes(tops, p, 1, 128), "nucleus", None) for p in (0.95, 0.99)]
    for name, sizes, kind, k in cases:
        batches = make_batches(rows, tops, sizes, args.rows_per_batch)
        runs.append(measure(name, batches, layout, kind, workdir, positions, tokens, k_for_baselines=k))
        runs2.append(measure(name + "_v2", batches, layout2, kind, workdir, positions, tokens, k_for_baselines=k))

    print(f"\n{'targets':<13}{'mean k':>7}{'(a) fp32':>10}{'(b) naive':>10}{'(c) DK':>8}{'(d) v2':>8}{'(d) v3':>8}"
          f"{'v3/v2':>7}{'d/c':>7}{'bits/id':>8}{'all cols':>9}{'err p>=1e-4':>12}{'err all':>8}{'rest err':>10}")
    print(f"{'':<13}{'':>7}{'B/pos':>10}{'B/pos':>10}{'B/pos':>8}{'B/pos':>8}{'B/pos':>8}{'':>7}{'':>7}{'':>8}"
          f"{'B/token':>9}")
    for r, r2 in zip(runs, runs2):
        base = (f"{r['raw_fp32_bytes_per_position']:>10}{r['naive_bytes_per_position']:>10}"
                f"{r['distillkit_bytes_per_position']:>8}") if "distillkit_bytes_per_position" in r else \
            f"{'-':>10}{'-':>10}{'-':>8}"
        ratio = f"{r['ratio_vs_distillkit']:>7.3f}" if "ratio_vs_distillkit" in r else f"{'-':>7}"
        v2, v3 = r2["ours_target_bytes_per_position"], r["ours_target_bytes_per_position"]
        print(f"{r['name']:<13}{r['mean_k']:>7.1f}{base}{v2:>8.1f}{v3:>8.1f}{v3 / v2:>7.3f}{ratio}"
              f"{r['ours_bits_per_entry']:>8.2f}{r['ours_all_bytes_per_token']:>9.1f}"
              f"{r['max_err_p_ge_1e-4']:>12.4f}{r['max_err_all']:>8.3f}{r['max_rest_err']:>10.2e}")
        assert max(abs(r[key] - r2[key]) for key in ("max_err_p_ge_1e-4", "max_err_all", "max_rest_err")) < 1e-6
    top64, top64_v2 = runs[1], runs2[1]
    for r in (top64, top64_v2):
        print(f"\nbytes/token by column at {r['name']}: " + ", ".join(
            f"{c} {v:.2f}" for c, v in sorted(r["by_column_bytes_per_token"].items(), key=lambda kv: -kv[1])))

    batches64 = make_batches(rows, tops, np.full(positions, 64), args.rows_per_batch)
    speed = codec_speed({3: top64["_cache"], 2: top64_v2["_cache"]}, batches64, args.repeats)
    print("\nspeed at top64, one core (M target positions/s of thread CPU time; versions alternated):")
    for version in ("v3", "v2"):
        sp = speed[version]
        print(f"  {version}: decode kernel {sp['decode_kernel_positions_per_s'] / 1e6:.2f}, read + decompress + "
              f"decode {sp['read_decode_positions_per_s'] / 1e6:.2f}; encode codec "
              f"{sp['encode_codec_positions_per_s'] / 1e6:.2f}, record batch "
              f"{sp['encode_record_batch_positions_per_s'] / 1e6:.2f}")

    # --- the variants the format was chosen from (k = 64) ---------------------------------------
    variants = {}
    print("\nvariants at top64, version 3 (target bytes/position; max error on p >= 1e-4):")
    for label, q in [("default " + str(S.Quantizer().steps), S.Quantizer()),
                     ("uniform 1/32", S.Quantizer(starts=(0.0,), steps=(1 / 32,))),
                     ("uniform 1/26 (err 0.0192)", S.Quantizer(starts=(0.0,), steps=(1 / 26,))),
                     ("1/128,1/32, tail 0.5", S.Quantizer(starts=(0.0, 1.0, 9.5), steps=(1 / 128, 1 / 32, 0.5), max_nats=79.5)),
                     ("1/128,1/64, tail 0.25", S.Quantizer(starts=(0.0, 1.0, 9.5), steps=(1 / 128, 1 / 64, 0.25)))]:
        r = measure("q" + str(len(variants)), batches64, S.Layout(vocab_size=V, quantizer=q), "topk",
                    workdir, positions, tokens)
        variants[label] = {"bytes_per_position": r["ours_target_bytes_per_position"],
                           "max_err_p_ge_1e-4": r["max_err_p_ge_1e-4"], "max_err_all": r["max_err_all"]}
        print(f"  quantiser {label:<58}{r['ours_target_bytes_per_position']:8.1f}  {r['max_err_p_ge_1e-4']:.4f}")
    for level in (1, 3, 7, 12, 19):
        r = measure(f"zstd{level}", batches64, layout, "topk", workdir, positions, tokens, zstd_level=level)
        variants[f"arrow_ipc_zstd{level}"] = {"bytes_per_position": r["ours_target_bytes_per_position"]}
        print(f"  Arrow IPC zstd level {level:<45}{r['ours_target_bytes_per_position']:8.1f}")
    for level in (3, 7, 19):
        b = zstandard_frame_bytes(top64["_cache"], level) / positions
        variants[f"zstandard_frames{level}"] = {"bytes_per_position": b}
        print(f"  zstandard frames level {level:<43}{b:8.1f}")
    print("  codings (one zstandard frame, level 1, per stream and record batch):")
    for name, b in coding_variants(batches64, V).items():
        variants[f"coding: {name}"] = {"bytes_per_position": b}
        print(f"    {name:<75}{b:8.1f}")

    wide = wide_vocab(args, rows, tops, {r["name"]: r for r in runs}, workdir) if args.wide_vocab else None

    summary = {r["name"]: {k: v for k, v in r.items() if k not in ("_cache", "name")} for r in runs}
    summary_v2 = {r["name"]: {k: v for k, v in r.items() if k not in ("_cache", "name")} for r in runs2}
    print(json.dumps({"bench": "codec", "teacher": str(args.teacher), "vocab_size": V, "positions": positions,
                      "format_version": S.FORMAT_VERSION, "runs": summary, "runs_v2": summary_v2, "speed": speed,
                      "variants": variants, "wide_vocab": wide}))


def wide_vocab(args, rows: torch.Tensor, tops: dict, narrow: dict, workdir: Path) -> dict:
    """The top-k runs again with every id permuted over range(args.wide_vocab), printed beside the runs at the
    teacher's own vocabulary (``narrow``, by name); each cache's ids checked back through the permutation."""
    positions, tokens, V = len(tops["label"]), rows.numel(), args.wide_vocab
    wide_rows, wide_tops, perm = permute_ids(rows, tops, V, seed=0)
    layout = S.Layout(vocab_size=V)
    print(f"\nthe same distributions with every id mapped through a seeded random permutation of range({V:,}) "
          f"(ids spread over the whole range, {layout.id_bytes} bytes per id symbol; decoded ids checked back "
          f"through the inverse permutation):")
    print(f"{'targets':<10}{'V=' + format(tops['vocab_size'], ','):>10}{'V=' + format(V, ','):>11}{'ratio':>7}"
          f"{'bits/id':>8}{'(c) DK':>8}{'d/c':>7}{'all cols':>9}{'err p>=1e-4':>12}")
    print(f"{'':<10}{'B/pos':>10}{'B/pos':>11}{'':>7}{'':>8}{'B/pos':>8}{'':>7}{'B/token':>9}")
    out = {"vocab_size": V, "id_bytes": layout.id_bytes, "permutation_seed": 0, "runs": {}}
    for k in (16, 64, 128):
        sizes = np.full(positions, k)
        r = measure(f"v{V}_top{k}", make_batches(wide_rows, wide_tops, sizes, args.rows_per_batch), layout, "topk",
                    workdir, positions, tokens, k_for_baselines=k)
        check_unpermuted(make_batches(rows, tops, sizes, args.rows_per_batch), r["_cache"], perm)
        base = narrow[f"top{k}"]["ours_target_bytes_per_position"]
        wide = r["ours_target_bytes_per_position"]
        print(f"{'top' + str(k):<10}{base:>10.1f}{wide:>11.1f}{wide / base:>7.3f}{r['ours_bits_per_entry']:>8.2f}"
              f"{r['distillkit_bytes_per_position']:>8}{r['ratio_vs_distillkit']:>7.3f}"
              f"{r['ours_all_bytes_per_token']:>9.1f}{r['max_err_p_ge_1e-4']:>12.4f}")
        out["runs"][f"top{k}"] = {key: v for key, v in r.items() if key not in ("_cache", "name")}
    return out


if __name__ == "__main__":
    main()
