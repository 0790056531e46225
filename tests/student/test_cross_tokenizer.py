"""Cross-tokenizer distillation (student/cross_tokenizer.py, cross_batch.py, uld.py): alignment on hand-made
tokenizers against hand-worked byte spans, the id map, the rest bucket's accounting, ULD against hand-computed
and dense values, and short training runs of both modes from a demo-teacher cache."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from teachercache.cli import main
from teachercache.format.manifest import TargetSpec
from teachercache.student.collate import collate_rows
from teachercache.student.cross_batch import CrossCollator, cross_batch_loss
from teachercache.student.cross_tokenizer import (BYTE_DECODER, MAP_FILE, Aligner, TokenBytes, alignment_share,
                                                  build_token_map, load_or_build_map, map_targets)
from teachercache.student.dataset import CacheDataset
from teachercache.student.evaluate import evaluate_model
from teachercache.student.kd_types import KDConfig, SparseTargets
from teachercache.student.losses import sparse_kd_reference
from teachercache.student.model import TrainError, load_student
from teachercache.student.options import KDOptions, LoaderOptions, ScheduleOptions, TrainOptions
from teachercache.student.train import train
from teachercache.student.uld import uld_dense, uld_loss, uld_reference
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions, DocumentCounts, iter_packed_rows

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "data" / "teacher"
TRAIN = ROOT / "data" / "corpus" / "train.parquet"
EOS = "<|endoftext|>"


# --------------------------------------------------------------------------------------------------------
# hand-made tokenizers


def _save(tok: Tokenizer, path: Path, **special) -> PreTrainedTokenizerFast:
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def bytelevel(path: Path, merges, added=(), **special):
    """Byte-level BPE: GPT-2's 256 byte characters (ids 0-255 in byte order), one id per merge, then the
    ``added`` special tokens and those named in ``special``."""
    vocab = {c: b for c, b in BYTE_DECODER.items()}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(added))
    return _save(tok, path, **special)


def sentencepiece(path: Path, tokens, merges, **special):
    """SentencePiece-style BPE: <0x00>..<0xFF> (ids 0-255), then ``tokens``; ▁ for spaces, prefixed to the text."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for t in tokens:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    return _save(tok, path, **special)


# "hello world": the teacher splits hello | Ġwor | ld, the student h | ello | Ġworld (hand-applied merges)
TEACHER_MERGES = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o"), ("Ġ", "w"), ("Ġw", "o"), ("Ġwo", "r"),
                  ("l", "d")]
STUDENT_MERGES = [("e", "l"), ("el", "l"), ("ell", "o"), ("Ġ", "w"), ("Ġw", "o"), ("r", "l"), ("Ġwo", "rl"),
                  ("Ġworl", "d")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    teacher = bytelevel(root / "teacher", TEACHER_MERGES, eos_token=EOS)
    student = bytelevel(root / "student", STUDENT_MERGES, added=["<pad>"], pad_token="<pad>", eos_token=EOS)
    return teacher, student


def _ids(tok, *tokens) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_tokenizers_split_as_worked_by_hand(pair):
    teacher, student = pair
    assert teacher.tokenize("hello world") == ["hello", "Ġwor", "ld"]
    assert student.tokenize("hello world") == ["h", "ello", "Ġworld"]
    assert student.convert_tokens_to_ids(EOS) != teacher.convert_tokens_to_ids(EOS)   # <pad> came first


def test_alignment_of_merges_that_split_differently(pair):
    teacher, student = pair
    aligner = Aligner.of(teacher, student)
    row = aligner.align(_ids(teacher, "hello", "Ġwor", "ld"), [True, True, False])
    # teacher bytes: hello [0,5) Ġwor [5,9) ld [9,11); its targets predict at 5 (i=0) and 9 (i=1)
    assert row.teacher_offsets.tolist() == [0, 5, 9, 11]
    assert row.ids.tolist() == _ids(student, "h", "ello", "Ġworld")
    assert row.starts.tolist() == [0, 1, 5]
    # j=0 predicts "ello" at byte 1, inside the row's first teacher token, which no teacher position predicts
    assert row.target_mask.tolist() == [False, True, False]
    assert row.teacher_index.tolist() == [-1, 0, -1]     # "Ġworld" and "Ġwor" both start at byte 5


def test_alignment_across_added_special_tokens(pair, tmp_path):
    teacher, student = pair
    ids = _ids(teacher, "hello", "Ġwor", "ld", EOS, "hello")
    mask = [True, True, True, True, False]
    # bytes: hello [0,5) Ġwor [5,9) ld [9,11) EOS [11,24) hello [24,29); teacher targets at 5, 9, 11, 24
    row = Aligner.of(teacher, student).align(ids, mask)
    assert row.ids.tolist() == _ids(student, "h", "ello", "Ġworld", EOS, "h", "ello")
    assert row.starts.tolist() == [0, 1, 5, 11, 24, 25]
    assert row.target_mask.tolist() == [False, True, True, True, True, False]
    assert row.teacher_index.tolist() == [-1, 0, 2, 3, -1, -1]
    # a student without that special token but with an EOS of its own: mapped by role
    other = bytelevel(tmp_path / "eos", STUDENT_MERGES, eos_token="</s>")
    row = Aligner.of(teacher, other).align(ids, mask)
    assert row.ids.tolist()[3] == other.eos_token_id
    # a student with no EOS at all: the separator is dropped, the text around it still aligns
    bare = bytelevel(tmp_path / "bare", STUDENT_MERGES)
    row = Aligner.of(teacher, bare).align(ids, mask)
    assert row.starts.tolist() == [0, 1, 5, 24, 25]
    assert row.teacher_index.tolist() == [-1, 0, 3, -1, -1]   # "h" at 24 <- teacher i=3; the EOS target (i=2) lost


def test_alignment_with_byte_fallback_and_a_prefix_space(tmp_path):
    teacher = bytelevel(tmp_path / "t", [("l", "l"), ("ll", "o"), ("Ã", "©")])
    student = sentencepiece(tmp_path / "s", ["▁", "h", "e", "l", "o", "lo", "▁h"], [("l", "o"), ("▁", "h")])
    assert teacher.tokenize("héllo") == ["h", "Ã©", "llo"]             # é = c3 a9: one teacher token
    assert student.tokenize("héllo") == ["▁h", "<0xC3>", "<0xA9>", "l", "lo"]   # é unknown: byte fallback
    bytes_of = TokenBytes.of(student)
    assert [bytes_of.spelled[i] for i in _ids(student, "▁h", "<0xC3>", "lo")] == [b" h", b"\xc3", b"lo"]
    aligner = Aligner.of(teacher, student)
    row = aligner.align(_ids(teacher, "h", "Ã©", "llo"), [True, True, False])
    # teacher: h [0,1) é [1,3) llo [3,6); the student's ▁ is its own prefix space, not a byte of the text
    assert row.starts.tolist() == [0, 1, 2, 3, 4]
    assert row.target_mask.tolist() == [True, True, True, True, False]
    assert row.teacher_index.tolist() == [0, -1, 1, -1, -1]
    # a row cut inside é: the lone continuation byte is dropped, the rest tokenised from byte 1
    row = aligner.align(_ids(teacher, "©", "llo"), [True, False])
    assert row.starts.tolist() == [1, 2] and row.ids.tolist() == _ids(student, "l", "lo")
    assert row.target_mask.tolist() == [True, False] and row.teacher_index.tolist() == [-1, -1]


def test_the_map_on_shared_and_unshared_tokens(pair, tmp_path):
    teacher, student = pair
    token_map = build_token_map(teacher, student)
    m = token_map.student_ids
    for shared in ("h", "e", "Ġ", "Ġw", "Ġwo"):                    # same string in both vocabularies
        assert m[teacher.convert_tokens_to_ids(shared)] == student.convert_tokens_to_ids(shared)
    for unshared in ("hello", "Ġwor", "ld", "he", "hell"):         # merges the student never made
        assert m[teacher.convert_tokens_to_ids(unshared)] == -1
    assert m[teacher.eos_token_id] == student.eos_token_id          # special: by content, at another id
    assert token_map.shared == 256 + 2 + 1                          # the bytes, Ġw, Ġwo, EOS
    # byte-fallback student: a byte maps to <0xNN> only where no ordinary token spells it
    sp = sentencepiece(tmp_path / "s", ["▁", "h", "l", "o", "lo"], [("l", "o")])
    m = build_token_map(teacher, sp).student_ids
    assert m[teacher.convert_tokens_to_ids("l")] == sp.convert_tokens_to_ids("l")
    assert m[teacher.convert_tokens_to_ids("Ã")] == sp.convert_tokens_to_ids("<0xC3>")
    assert m[teacher.convert_tokens_to_ids("Ġ")] == sp.convert_tokens_to_ids("▁")   # both spell b" "
    # cached beside the output, keyed by both fingerprints
    path = tmp_path / MAP_FILE
    first = load_or_build_map(path, teacher, student)
    record = json.loads(path.read_text())
    assert record["student_ids"] == first.student_ids.tolist() and record["shared"] == 259
    record["student_ids"][0] = 7                                     # a stored map is read back, not rebuilt
    path.write_text(json.dumps(record))
    assert load_or_build_map(path, teacher, student).student_ids[0] == 7
    assert load_or_build_map(path, teacher, sp).student_fingerprint != first.student_fingerprint


def test_unmapped_mass_joins_the_rest_bucket():
    rng = np.random.default_rng(0)
    student_ids = np.array([3, -1, 0, 3, -1, 5, 1, -1])             # teacher ids 0 and 3 both spell student 3
    sizes = np.array([3, 0, 5, 2, 8])
    offsets = np.r_[0, np.cumsum(sizes)]
    ids = np.concatenate([rng.permutation(8)[:k] for k in sizes])
    probs = rng.dirichlet(np.ones(9), len(sizes))                    # 8 ids + the rest, per position
    pos = np.repeat(np.arange(len(sizes)), sizes)
    logprobs = np.log(probs[pos, ids]).astype(np.float32)
    stored = np.bincount(pos, np.exp(logprobs.astype(np.float64)), minlength=len(sizes))
    rest = (1 - stored).astype(np.float32)
    counts = np.arange(len(ids), dtype=np.int64)
    o, i, lp, r, c = map_targets(offsets, ids, logprobs, rest, counts, student_ids)
    new_pos = np.repeat(np.arange(len(sizes)), np.diff(o))
    total = np.bincount(new_pos, np.exp(lp.astype(np.float64)), minlength=len(sizes)) + r
    np.testing.assert_allclose(total, 1.0, atol=1e-6)                # mapped + rest = 1
    for p in range(len(sizes)):                                       # a dense reference, position by position
        want: dict[int, float] = {}
        lost = 0.0
        for e in range(offsets[p], offsets[p + 1]):
            s = student_ids[ids[e]]
            if s < 0:
                lost += math.exp(logprobs[e])
            else:
                want[s] = want.get(s, 0.0) + math.exp(logprobs[e])
        got = {int(a): math.exp(b) for a, b in zip(i[o[p]:o[p + 1]], lp[o[p]:o[p + 1]])}
        assert got.keys() == want.keys() and len(i[o[p]:o[p + 1]]) == len(want)   # merged, distinct
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-6)
        assert r[p] == pytest.approx(rest[p] + lost, abs=1e-6)
    assert c.sum() == counts[student_ids[ids] >= 0].sum()            # draws of mapped ids kept, merged ones summed


# --------------------------------------------------------------------------------------------------------
# ULD


def test_uld_by_hand_and_against_the_references():
    # teacher stores 0.5 and 0.2, rest 0.3; student q = (0.1, 0.6, 0.2, 0.1) -> sorted 0.6, 0.2 | tail 0.2
    targets = SparseTargets(torch.tensor([0, 2]), torch.tensor([7, 9]), torch.tensor([0.5, 0.2]).log(),
                            torch.tensor([0.3]))
    logits = torch.tensor([[0.1, 0.6, 0.2, 0.1]]).log()
    assert float(uld_loss(logits, targets)[0]) == pytest.approx(0.1 + 0.0 + 0.1, abs=1e-6)
    # random positions: the batched loss equals the plain loop, at T = 1 and T = 2
    g = torch.Generator().manual_seed(0)
    n, vocab, k = 6, 11, 4
    full = torch.softmax(torch.randn(n, 13, generator=g) * 2, -1)             # teacher over 13 ids
    top = full.topk(k, -1)
    sizes = torch.tensor([4, 4, 1, 0, 3, 4])
    keep = torch.arange(k)[None, :] < sizes[:, None]
    sparse = SparseTargets(torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]), top.indices[keep],
                           top.values[keep].log().float(), (1 - (top.values * keep).sum(-1)).float())
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    for t in (1.0, 2.0):
        np.testing.assert_allclose(uld_loss(z, sparse, t).numpy(), uld_reference(z, sparse, t), rtol=1e-6, atol=1e-7)
    # with the teacher's whole distribution stored it is the paper's loss (zero-padded, sorted, L1) ...
    whole = SparseTargets(torch.arange(n + 1) * 13, torch.arange(13).repeat(n), full.reshape(-1).log().float(),
                          torch.zeros(n))
    np.testing.assert_allclose(uld_loss(z, whole).numpy(), uld_dense(full.double(), torch.softmax(z, -1)).numpy(),
                               atol=1e-6)
    # ... and from a top-k cache a lower bound of it
    dense = uld_dense(full.double(), torch.softmax(z, -1))
    assert bool((uld_loss(z, sparse)[sizes == k] <= dense[sizes == k] + 1e-7).all())
    z.requires_grad_(True)
    uld_loss(z, sparse).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# from a demo-teacher cache


def _tool():
    spec = importlib.util.spec_from_file_location("make_student_tokenizer", ROOT / "tools" / "make_student_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A top-16 cache of the demo teacher (2 documents, rows of 64) and a student directory with its own
    SentencePiece-style tokenizer (tools/make_student_tokenizer.py, 600 ids over 20 documents) and llama-tiny."""
    root = tmp_path_factory.mktemp("cross")
    build_cache(BuildOptions(teacher=str(TEACHER), out=str(root / "cache"), progress=False, batch_size=8,
                             data=DataOptions(paths=(str(TRAIN),), seq_len=64, max_docs=2),
                             targets=TargetSpec(kind="topk", k=16)))
    texts = pq.read_table(TRAIN, columns=["text"]).column("text").to_pylist()[:20]
    tokenizer = _tool().train_tokenizer(texts, 600)
    tokenizer.save_pretrained(root / "student")
    torch.manual_seed(0)
    load_student("llama-tiny", len(tokenizer)).save_pretrained(root / "student")
    return root / "cache", root / "student"


def _rows(cache, n=8):
    return [row for _, row in zip(range(n), CacheDataset(cache, shuffle=False, rank=0, world_size=1))]


def test_the_same_tokenizer_through_the_cross_path_keeps_every_target(setting):
    cache, _ = setting
    teacher = AutoTokenizer.from_pretrained(cache / "tokenizer")
    rows = _rows(cache)
    share = alignment_share(rows, Aligner.of(teacher, teacher))
    assert share["share"] == 1.0 and share["teacher_share"] == 1.0
    exact = CrossCollator(Aligner.of(teacher, teacher), "exact", 0)(rows[:4])
    plain = collate_rows(rows[:4])
    assert bool(exact.aligned.all()) and torch.equal(exact.input_ids, plain.input_ids)
    for name in ("labels", "target_positions", "target_offsets", "target_ids", "target_logprobs", "rest_mass"):
        assert torch.equal(getattr(exact, name), getattr(plain, name)), name


def test_the_loss_of_a_cross_batch_against_its_parts(setting):
    cache, student_dir = setting
    teacher = AutoTokenizer.from_pretrained(cache / "tokenizer")
    student = AutoTokenizer.from_pretrained(student_dir)
    model = load_student("llama-tiny", len(student))
    aligner, rows = Aligner.of(teacher, student), _rows(cache, 4)
    batch = CrossCollator(aligner, "exact", student.pad_token_id)(rows)
    a = batch.aligned
    assert 0 < int(a.sum()) < batch.num_positions
    # each aligned position's mapped mass and rest, from the rows one entry at a time (the cache rounds its
    # log-probs, so stored + rest is 1 only to ~1e-3; a rest bucket that would pass 1 is held at 1)
    sizes = batch.target_offsets.diff()
    mass = torch.zeros(int(a.sum()), dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(len(sizes)), sizes), batch.target_logprobs.double().exp())
    mapped, rest = [], []
    for row in rows:
        index = aligner.align(row["input_ids"], row["target_mask"]).teacher_index
        for i in index[index >= 0]:
            p = [(aligner.token_map.student_ids[row["target_ids"][e]], math.exp(row["target_logprobs"][e]))
                 for e in range(row["target_offsets"][i], row["target_offsets"][i + 1])]
            mapped.append(sum(x for s, x in p if s >= 0))
            rest.append(min(1.0, row["rest_mass"][i] + sum(x for s, x in p if s < 0)))
    torch.testing.assert_close(mass, torch.tensor(mapped, dtype=torch.float64), atol=2e-6, rtol=0)
    torch.testing.assert_close(batch.rest_mass.double(), torch.tensor(rest, dtype=torch.float64), atol=2e-6, rtol=0)
    w = torch.full((batch.num_positions,), 1 / batch.num_positions, dtype=torch.float64)
    config = KDConfig(ce_weight=0.0, kd_weight=1.0)
    total, parts = cross_batch_loss(model, batch, w, config, "exact", 0.5, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    z = logits.reshape(-1, logits.shape[-1])[batch.target_positions].double()
    labels = batch.labels.reshape(-1)[batch.target_positions]
    ce = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    kd_total, _, _ = sparse_kd_reference(z[a], batch.sparse_targets(), None, w[a], config)
    assert float(total) == pytest.approx(float(kd_total + (0.5 * w[~a] * ce[~a]).sum()), rel=1e-4)
    # the CE twin through the same path: plain cross-entropy over every student position
    twin, _ = cross_batch_loss(model, batch, w, KDConfig(ce_weight=1.0, kd_weight=0.0), "exact", 1.0,
                               torch.device("cpu"))
    assert float(twin) == pytest.approx(float(ce.mean()), rel=1e-5)


def _options(setting, out, mode, **kw):
    cache, student = setting
    kw.setdefault("kd", KDOptions())
    return TrainOptions(cache=str(cache), student=str(student), out=str(out), progress=False, log_every=1,
                        schedule=ScheduleOptions(steps=3, batch_size=4, lr=3e-3, warmup_steps=1),
                        loader=LoaderOptions(shuffle_buffer=64), cross_tokenizer=mode, **kw)


@pytest.mark.parametrize("mode, kd", [("exact", KDOptions()), ("uld", KDOptions(ce_weight=1.0))])
def test_a_short_run_in_each_mode_trains_the_student(setting, tmp_path, mode, kd):
    before = load_file(setting[1] / "model.safetensors")
    result = train(_options(setting, tmp_path / mode, mode, kd=kd))
    after = load_file(result.out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in records)
    saved = json.loads((result.out / MAP_FILE).read_text())
    assert saved["mode"] == mode and 0 < saved["alignment"]["share"] < 1 and saved["shared"] > 0
    assert AutoTokenizer.from_pretrained(result.out).get_vocab() == AutoTokenizer.from_pretrained(setting[1]).get_vocab()


def test_another_tokenizer_is_refused_without_the_flag(setting, tmp_path):
    with pytest.raises(TrainError, match="add --cross-tokenizer exact"):
        train(_options(setting, tmp_path / "refused", None))
    with pytest.raises(TrainError, match="--ce-alpha > 0"):
        train(_options(setting, tmp_path / "uld", "uld"))
    with pytest.raises(TrainError, match="--cross-tokenizer exact does not combine with --fused-head"):
        train(_options(setting, tmp_path / "fused", "exact", fused_head=True))
    code = CliRunner().invoke(main, ["train", "--cache", str(setting[0]), "--student", str(setting[1]), "--out",
                                     str(tmp_path / "cli"), "--steps", "1", "--no-progress"])
    assert code.exit_code != 0 and "--cross-tokenizer" in code.output


def test_bits_per_byte_counts_the_bytes_of_the_predicted_text(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 8)
    tok = AutoTokenizer.from_pretrained(TEACHER)
    torch.manual_seed(0)
    model = load_student("llama-tiny", len(tok))
    r = evaluate_model(model, text, tok, batch_size=2, seq_len=32)
    rows = list(iter_packed_rows(DataOptions(paths=(str(text),), seq_len=32), tok, DocumentCounts()))
    predicted = [int(row.input_ids[t + 1]) for row in rows for t in np.flatnonzero(row.target_mask[:-1])]
    assert len(predicted) == r.positions
    # ASCII text: each token decodes alone; the EOS between documents spells no text
    nbytes = sum(len(tok.decode([t]).encode()) for t in predicted if t != tok.eos_token_id)
    assert r.bits_per_byte == pytest.approx(r.loss * r.positions / (math.log(2) * nbytes), rel=1e-9)
    out = CliRunner().invoke(main, ["eval", "--model", str(TEACHER), "--data", str(text), "--seq-len", "32"])
    assert out.exit_code == 0, out.output
    keys = [line.split()[0] for line in out.output.splitlines() if line.strip()]
    assert keys.index("bits_per_byte") == keys.index("perplexity") + 1
