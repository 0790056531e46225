"""Opening a cache must never run code or read out of bounds.

- No code-executing loader (pickle and friends, torch.load, eval/exec) in the packages, found by scanning
  their code tokens (docstrings and comments may say "no pickle").
- trust_remote_code is passed through from an explicit option, never turned on, and every option that
  carries it is off by default.
- Manifest paths stay inside the cache directory, whatever the manifest says.
- The numba decoder checks every read against the declared lengths: hostile sizes, offsets, contexts and
  byte streams give a CacheCorruptError. This runs in a subprocess with NUMBA_BOUNDSCHECK=1 (and a fresh
  numba cache), so an out-of-bounds index in a kernel is an IndexError there instead of a silent read, and
  a segfault fails the test instead of killing pytest.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("teachercache", "student")
FORBIDDEN_NAMES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "read_pickle"}
FORBIDDEN = re.compile(r"\bimport pickle\b|\bpickle\.|\btorch\.load\(|\bnp\.load\(.*allow_pickle=True"
                       r"|trust_remote_code\s*=\s*True|\bimport dill\b|\bimport joblib\b")


def code_hits(source: str) -> list[tuple[int, str]]:
    """(line, what) of each forbidden construct among the code tokens of ``source``."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.NAME, tokenize.OP)]
    hits = []
    for i, t in enumerate(toks):
        before = toks[i - 1].string if i else ""
        after = toks[i + 1].string if i + 1 < len(toks) else ""
        after2 = toks[i + 2].string if i + 2 < len(toks) else ""
        if t.type == tokenize.NAME and (t.string in FORBIDDEN_NAMES or "pickle" in t.string.lower()):
            if not (t.string == "allow_pickle" and after == "=" and after2 == "False"):
                hits.append((t.start[0], t.string))
        elif t.string in ("eval", "exec", "__import__") and after == "(" and before not in (".", "def"):
            hits.append((t.start[0], f"{t.string}("))
        elif t.string == "load" and before == "." and i >= 2 and toks[i - 2].string == "torch":
            hits.append((t.start[0], "torch.load"))
        elif t.string == "trust_remote_code" and after == "=" and after2 == "True":
            hits.append((t.start[0], "trust_remote_code=True"))
    return hits


def test_no_code_executing_loaders_in_the_packages():
    hits = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            source = path.read_text(encoding="utf-8")
            hits += [f"{path.relative_to(ROOT)}:{n}: {what}" for n, what in code_hits(source)]
            hits += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                     for n, line in enumerate(source.splitlines(), 1) if FORBIDDEN.search(line)]
    for path in (ROOT / "tools").rglob("*.py"):  # tools may mention them in text, not call them
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


def test_the_scan_would_catch_them():
    for code, what in [("import pickle", "pickle"), ("from pickle import loads", "pickle"),
                       ("x = torch.load(f)", "torch.load"), ("eval('1')", "eval("), ("exec(code)", "exec("),
                       ("m = f(p, trust_remote_code=True)", "trust_remote_code=True"),
                       ("import cloudpickle as cp", "cloudpickle"), ("pd.read_pickle(p)", "read_pickle"),
                       ("np.load(p, allow_pickle=True)", "allow_pickle"), ("__import__('os')", "__import__(")]:
        assert [w for _, w in code_hits(code)] == [what], code
    for harmless in ['"""no pickle, no torch.load"""', "# never eval(...)", "model.eval()", "self.exec(x)",
                     "def eval(self):\n    pass", "f(trust_remote_code=options.trust_remote_code)",
                     "np.load(p, allow_pickle=False)"]:
        assert code_hits(harmless) == [], harmless


def test_trust_remote_code_is_off_unless_asked_for():
    import click

    from teachercache.student.options import TrainOptions
    from teachercache.cli.cache import build_command
    from teachercache.cli.student import eval_command, train_command
    from teachercache.teacher.build import BuildOptions
    from teachercache.teacher.corpus import DataOptions

    assert BuildOptions(teacher="t", data=DataOptions(paths=("x",)), out="o").trust_remote_code is False
    assert TrainOptions(cache="c", student="s", out="o").trust_remote_code is False
    for command in (build_command, train_command, eval_command):
        (param,) = [p for p in command.params if p.name == "trust_remote_code"]
        assert param.is_flag and not param.get_default(click.Context(command)), command.name
    # every place that passes the keyword passes a variable or an option, never a literal
    literal = re.compile(r"trust_remote_code\s*=\s*(True|1|\"|')")
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                assert not literal.search(line), f"{path}:{n}: {line.strip()}"


TRAVERSALS = ["../outside.arrow", "/etc/hostname", "shards/../../outside.arrow", "shards/\x00.arrow",
              "shards\\..\\..\\x.arrow", "", "//etc/hostname", "shards/part.arrow/../../..", "..", "./../x"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_manifest_paths_cannot_leave_the_cache(tmp_path, name):
    from helpers import random_batch, write_cache

    from teachercache.errors import CachePathError
    from teachercache.format import schema as S
    from teachercache.format.cache import Cache
    from teachercache.format.manifest import MANIFEST_NAME

    layout = S.Layout(vocab_size=50)
    write_cache(tmp_path / "c", [random_batch(np.random.default_rng(0), layout, [6])], layout)
    raw = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    raw["shards"][0]["file"] = name
    (tmp_path / "c" / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(CachePathError, match="manifest.json: shard path") as info:
        Cache.open(tmp_path / "c")
    assert str(tmp_path / "c" / MANIFEST_NAME) in str(info.value)


def test_a_shard_symlinked_out_of_the_cache_is_refused(tmp_path):
    from helpers import random_batch, write_cache

    from teachercache.errors import CachePathError
    from teachercache.format import schema as S
    from teachercache.format.cache import Cache

    layout = S.Layout(vocab_size=50)
    m = write_cache(tmp_path / "c", [random_batch(np.random.default_rng(0), layout, [6])], layout)
    shard = tmp_path / "c" / m.shards[0].file
    (tmp_path / "elsewhere.arrow").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere.arrow")
    with pytest.raises(CachePathError, match="resolves outside the cache directory"):
        Cache.open(tmp_path / "c")


HOSTILE_DECODE = r'''
import sys
import numpy as np
import pyarrow as pa
from teachercache.format import codec, schema as S
from teachercache.errors import CacheCorruptError, CacheFormatError
from teachercache.format.records import decode_batch, encode_batch
sys.path.insert(0, sys.argv[1])
from helpers import random_batch

REFUSED = (CacheCorruptError, CacheFormatError)

def csr(groups):
    offsets = np.concatenate([[0], np.cumsum([len(g[0]) for g in groups])]).astype(np.int64)
    return offsets, np.concatenate([g[0] for g in groups]).astype(np.int64), \
        np.concatenate([g[1] for g in groups]).astype(np.float32)

def copy(s, **changes):
    fields = {f: np.array(getattr(s, f), copy=True) for f in codec.TargetStreams.FIELDS}
    fields.update({k: np.asarray(v) for k, v in changes.items()})
    return codec.TargetStreams(**fields)

layouts = {"plain": S.Layout(vocab_size=10), "sampled": S.Layout(vocab_size=10, sampled=True),
           "2-byte ids": S.Layout(vocab_size=1000), "3-byte ids": S.Layout(vocab_size=70000)}
named = 0
for lname, layout in layouts.items():
    V = layout.vocab_size
    offsets, ids, lps = csr([([5, 9, 2], [-0.1, -3.0, -3.0]), ([V - 1], [-20.0]), ([9, 5, 1], [-0.2, -2.0, -4.0])])
    rp = np.array([0, 2, 3], np.int64)
    ctx = (np.array([1, 2, 1]), np.array([-1, 1, -1]))
    counts = np.array([1, 2, 3, 4, 5, 6, 7]) if layout.sampled else None
    good = codec.encode_targets(rp, offsets, ids, lps, counts, ctx, layout)
    sizes = np.diff(offsets).astype(np.uint16)
    back = codec.decode_targets(sizes, rp, ctx, good, layout)
    assert sorted(back[1][:3].tolist()) == [2, 5, 9], back
    L = {f: len(getattr(good, f)) for f in ("ids", "values", "hits", "refs", "counts")}
    cases = {
        "sizes beyond the streams": (np.full(3, 65535, np.uint16), rp, ctx, good),
        "one size too large": (sizes + np.array([0, 0, 1], np.uint16), rp, ctx, good),
        "value offset beyond its stream": (sizes, rp, ctx, copy(good, value_offsets=[0, L["values"] - 1, L["values"] + 7])),
        "negative first offset": (sizes, rp, ctx, copy(good, ref_offsets=[-4, 3, L["refs"]])),
        "decreasing offsets": (sizes, rp, ctx, copy(good, id_offsets=[0, L["ids"], 1])),
        "huge offset": (sizes, rp, ctx, copy(good, value_offsets=[0, 2**62, 2**62])),
        "offsets of the wrong length": (sizes, rp, ctx, copy(good, ref_offsets=[0, L["refs"]])),
        "row positions beyond the sizes": (sizes, np.array([0, 2, 9]), ctx, good),
        "negative row positions": (sizes, np.array([0, -2, 3]), ctx, good),
        "contexts of the wrong length": (sizes, rp, (ctx[0][:2], ctx[1][:2]), good),
        "context token beyond the vocabulary": (sizes, rp, (np.array([1, 2, 10**9]), ctx[1]), good),
        "negative context token": (sizes, rp, (np.array([1, -7, 1]), ctx[1]), good),
        "prev token beyond the vocabulary": (sizes, rp, (ctx[0], np.array([-1, 10**12, -1])), good),
        "id stream not whole symbols": (sizes, rp, ctx, copy(good, ids=good.ids[:-1], id_offsets=[0, good.id_offsets[1], L["ids"] - 1])),
        "a reference far beyond its list": (sizes, rp, ctx, copy(good, refs=np.full(L["refs"], 0x7F, np.uint8))),
        "every entry a hit": (sizes, rp, ctx, copy(good, hits=np.full(L["hits"], 0xFF, np.uint8))),
        "hit bitmap offset beyond its stream": (sizes, rp, ctx, copy(good, hit_offsets=[0, 1, L["hits"] + 1])),
        "an overlong varint": (sizes, rp, ctx, copy(good, values=np.full(L["values"], 0xFF, np.uint8))),
        "a varint cut at the stream end": (sizes, rp, ctx, copy(good, values=np.concatenate([good.values[:-1], [0x80]]).astype(np.uint8))),
        "all-0xFF ids": (sizes, rp, ctx, copy(good, ids=np.full(L["ids"], 0xFF, np.uint8))),
        "empty streams": (sizes, rp, ctx, codec.TargetStreams(*(np.zeros(0, np.uint8), np.zeros(3, np.int64)) * 5)),
    }
    if layout.sampled:
        cases["count stream cut"] = (sizes, rp, ctx, copy(good, counts=good.counts[:-2], count_offsets=[0, good.count_offsets[1], L["counts"] - 2]))
        cases["count varint overlong"] = (sizes, rp, ctx, copy(good, counts=np.full(L["counts"], 0xFF, np.uint8)))
    for name, (sz, r, c, st) in cases.items():
        try:
            codec.decode_targets(sz, r, c, st, layout, where="hostile.arrow")
        except REFUSED as e:
            assert "hostile.arrow" in str(e), e
            named += 1
            continue
        sys.exit(f"{lname}: {name}: decoded without an error")

# valid encodings with 1-3 random mutations (a byte, a size, a context, an offset): decoded or refused,
# never an IndexError (boundscheck on) or a crash
rng = np.random.default_rng(0)
decoded = refused = 0
for trial in range(3000):
    layout = list(layouts.values())[trial % 4]
    V = layout.vocab_size
    B, P = int(rng.integers(1, 4)), int(rng.integers(1, 12))
    groups = []
    for _ in range(P):
        n = int(rng.integers(1, 6))
        groups.append((rng.choice(min(V, 40), n, replace=False), -rng.random(n).astype(np.float32) * 8))
    offsets, ids, lps = csr(groups)
    rp = np.concatenate([[0], np.sort(rng.integers(0, P + 1, B - 1)), [P]]).astype(np.int64)
    ctx = (rng.integers(0, 3, P), np.where(rng.random(P) < 0.3, -1, rng.integers(0, 3, P)))
    counts = rng.integers(1, 5, len(ids)) if layout.sampled else None
    st = copy(codec.encode_targets(rp, offsets, ids, lps, counts, ctx, layout))
    sizes = np.diff(offsets).astype(np.uint16)
    for _ in range(int(rng.integers(1, 4))):
        what = int(rng.integers(0, 4))
        if what == 0:
            name = ["ids", "values", "hits", "refs", "counts"][int(rng.integers(0, 5 if layout.sampled else 4))]
            stream = getattr(st, name)
            if len(stream):
                stream[rng.integers(len(stream))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        elif what == 1:
            sizes[rng.integers(P)] += np.uint16(rng.choice([1, 2, 65535, 65534, 100]))
        elif what == 2:
            ctx[int(rng.integers(0, 2))][rng.integers(P)] = rng.choice([-2, -1, 0, 1, V - 1, V, 2**40])
        else:
            name = ["id_offsets", "value_offsets", "hit_offsets", "ref_offsets", "count_offsets"][int(rng.integers(0, 5))]
            getattr(st, name)[rng.integers(B + 1)] += int(rng.choice([-3, -1, 1, 2, 1000, -(2**40)]))
    try:
        codec.decode_targets(sizes, rp, ctx, st, layout)
        decoded += 1
    except REFUSED:
        refused += 1

# hostile record batches through records.decode_batch (list offsets the Arrow arrays do not vouch for)
layout = S.Layout(vocab_size=300, sampled=True, hidden_layers=(1,), hidden_width=4)
rb = encode_batch(random_batch(np.random.default_rng(1), layout, [9, 7], k=None), layout)
def with_column(rb, name, array):
    cols = [array if n == name else rb.column(n) for n in rb.schema.names]
    return pa.RecordBatch.from_arrays(cols, schema=rb.schema)
col = rb.column("target_values")
hostile = {
    "sizes at 65535": with_column(rb, "target_sizes", pa.array([[65535] * len(x) for x in rb.column("target_sizes").to_pylist()], pa.list_(pa.uint16()))),
    # version 2 streams are per row; version 3's are the batch's, all in its first row (bytes elsewhere: damage)
    "one row's values moved to the other": with_column(rb, "target_values", pa.array(
        [col[0].as_py() + col[1].as_py()[:3], col[1].as_py()[3:]] if len(col[1]) >= 3 else
        [col[0].as_py()[:-3], col[0].as_py()[-3:] + col[1].as_py()], pa.list_(pa.uint8()))),
    "values cut short": with_column(rb, "target_values", pa.array(
        [col[0].as_py(), col[1].as_py()[:-4]] if len(col[1]) >= 4 else [col[0].as_py()[:-4], col[1].as_py()],
        pa.list_(pa.uint8()))),
    "input ids shorter than the mask": with_column(rb, "input_ids", pa.array([[1] * 9, [1] * 6], pa.list_(pa.int32()))),
    "hidden states too short": with_column(rb, "hidden_1", pa.array([[0] * 4, [0] * 4], pa.list_(pa.uint16()))),
    "tokens beyond the vocabulary": with_column(rb, "input_ids", pa.array([[10**6] * 9, [-5] * 7], pa.list_(pa.int32()))),
}
for name, bad in hostile.items():
    try:
        decode_batch(bad, layout, where="hostile.arrow")
    except REFUSED as e:
        assert "hostile.arrow" in str(e), e
        named += 1
        continue
    sys.exit(f"record batch: {name}: decoded without an error")
print(f"OK {named} refused naming the file; random: {decoded} decoded, {refused} refused")
'''


def test_hostile_lengths_never_read_out_of_bounds(tmp_path):
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", HOSTILE_DECODE, str(ROOT / "tests")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    named, decoded, refused = map(int, re.findall(r"\d+", proc.stdout.splitlines()[-1]))
    assert named == 4 * 21 + 2 + 6 and refused > 1500 and decoded > 100, proc.stdout


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("checksums", [True, False])
def test_a_shard_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind, checksums):
    import signal

    from helpers import random_batch, write_cache

    from teachercache.errors import CacheCorruptError
    from teachercache.format import schema as S
    from teachercache.format.cache import Cache

    layout = S.Layout(vocab_size=50)
    m = write_cache(tmp_path / "c", [random_batch(np.random.default_rng(0), layout, [6])], layout)
    shard = tmp_path / "c" / m.shards[0].file
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    def hung(*_):
        raise TimeoutError("the reader blocked on the shard")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)  # opening a FIFO for reading blocks until a writer comes: that was a hang
    try:
        with pytest.raises(CacheCorruptError, match="is not a regular file") as info:
            list(Cache.open(tmp_path / "c", verify_checksums=checksums).iter_batches())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(shard) in str(info.value)
