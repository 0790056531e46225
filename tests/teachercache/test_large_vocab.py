"""Real vocabulary sizes end to end on CPU (issue 20): build, verify, decode and train at Qwen 2's and Gemma 3's
vocabularies, where target ids need 3 bytes.

* Qwen 2: ``Qwen2Tokenizer`` with 151,936 ids under a ``Qwen2ForCausalLM`` head of 152,064 rows, as the real
  checkpoints ship. The 128 padding rows are made the likeliest outputs on purpose, so a build that stored
  them or normalised over them would be caught by the dense reference. The student has the padded head too.
* Gemma 3: 262,144 ids, head = tokenizer, a ``Gemma3ForCausalLM`` (Gemma 3 1B's class and vocabulary size:
  tied, sqrt(H)-scaled embeddings and sliding-window layers go through the teacher's split head as the real
  model's would), with Gemma's special tokens and a BOS before each text. Built twice: top-k and sampled.

Both tokenizers are real ``tokenizers`` byte-level BPEs (Qwen 2's pre-tokeniser), 1,500 tokens trained on the
start of the first held-out documents, their tokens moved to ids drawn over the whole range and the other ids
filled with tokens no merge produces. (A WordLevel model will not do for Qwen 2: transformers 5 loads a qwen2
directory with Qwen2Tokenizer whatever tokenizer_config.json names, which rebuilds a BPE from the vocabulary
and merges.) So the input ids and the teacher's top-k both reach above 2^16 and 2^17. Models are tiny (hidden
32, one layer; the embedding is most of the parameters) and initialised wide (``initializer_range`` 0.5) so
that the teacher's distributions are peaked, not uniform over 150k ids, and the stored log-probs fall in every
piece of the quantiser. Each cache is compared with a float64 log-softmax of the model's own forward over the
tokenizer's ids, decoded again by the docs/FORMAT.md decoder, shown, and trained on (fused head against
unfused).
"""

from __future__ import annotations

import collections
import functools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from teachercache.student.options import KDOptions, LoaderOptions, ScheduleOptions, TrainOptions
from teachercache.student.train import train
from teachercache.format import schema as S
from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.inspect.report import inspect_cache
from teachercache.inspect.show import format_text, show_row
from teachercache.inspect.verify import verify_cache
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions
from teachercache.teacher.targets import compute_targets

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"
DOCS, CHARS = 3, 900   # the corpus: the start of the first held-out documents
SEQ_LEN = 48
QWEN2_TOKENS, QWEN2_ROWS = 151_936, 152_064
GEMMA3_TOKENS = 262_144
K = 16


@functools.lru_cache(maxsize=1)
def _texts() -> list[str]:
    """The corpus: the first CHARS characters of each of the first DOCS held-out documents."""
    return [t[:CHARS] for t in pq.read_table(CORPUS, columns=["text"]).column("text").to_pylist()[:DOCS]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    return path


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """A byte-level BPE of 1,500 tokens trained on the corpus: (its tokens, most used first; merges)."""
    texts = _texts()
    tok = _qwen2_pipeline(Tokenizer(BPE()))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    used = collections.Counter(i for text in texts for i in tok.encode(text).ids)
    model = json.loads(tok.to_str())["model"]
    order = sorted(model["vocab"].items(), key=lambda kv: (-used[kv[1]], kv[1]))  # most used first
    return [token for token, _ in order], [tuple(m) for m in model["merges"]]


def _qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    """Qwen 2's normaliser, pre-tokeniser (its split regex, then bytes) and decoder, as Qwen2Tokenizer builds them."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spread_vocab(vocab_size: int, specials: dict[str, int], seed: int) -> tuple[dict[str, int], list]:
    """(vocab, merges) of vocab_size ids: the specials where given, the trained tokens at ids drawn from the
    whole remaining range (the most used one at the highest), fillers ('<f123>', which no merge
    produces) everywhere else."""
    tokens, merges = _trained_bpe()
    free = np.setdiff1d(np.arange(vocab_size), list(specials.values()))
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[free[-1]], rng.choice(free[:-1], len(tokens) - 1, replace=False)])
    names = [f"<f{i}>" for i in range(vocab_size)]
    for name, i in [*specials.items(), *zip(tokens, ids.tolist(), strict=True)]:
        names[i] = name
    vocab = {name: i for i, name in enumerate(names)}
    assert len(vocab) == vocab_size
    return vocab, merges


def _qwen2_tokenizer(path: Path):
    """Qwen2Tokenizer itself (what AutoTokenizer loads for a qwen2 config whatever tokenizer_config.json says),
    151,936 ids, <|endoftext|> the last."""
    vocab, merges = _spread_vocab(QWEN2_TOKENS, {"<|endoftext|>": QWEN2_TOKENS - 1}, seed=1)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(path)
    return tok


def _gemma3_tokenizer(path: Path):
    """262,144 ids with Gemma's specials (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and a BOS before each text."""
    specials = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab, merges = _spread_vocab(GEMMA3_TOKENS, specials, seed=2)
    model = _qwen2_pipeline(Tokenizer(BPE(vocab=vocab, merges=merges)))
    model.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                         special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>")
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    """Qwen 2's shape: 151,936 tokens, 152,064 head rows, untied; the padding rows dominate the logits."""
    path = tmp_path_factory.mktemp("qwen2")
    _qwen2_tokenizer(path)
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=QWEN2_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.5)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # padding rows = 3x the first real rows: their logits are 3x those, the largest
        model.lm_head.weight[QWEN2_TOKENS:] = 3 * model.lm_head.weight[:QWEN2_ROWS - QWEN2_TOKENS]
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    """Gemma 3's 262,144 ids, head = tokenizer (tied)."""
    path = tmp_path_factory.mktemp("gemma3")
    _gemma3_tokenizer(path)
    torch.manual_seed(2)
    cfg = Gemma3TextConfig(vocab_size=GEMMA3_TOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                           sliding_window=16, initializer_range=0.5)
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    return path


def _build(teacher: Path, corpus: Path, out: Path, targets: TargetSpec) -> Cache:
    build_cache(BuildOptions(teacher=str(teacher), out=str(out), progress=False, device="cpu", batch_size=4,
                             targets=targets, data=DataOptions(paths=(str(corpus),), seq_len=SEQ_LEN)))
    assert verify_cache(out, deep=True) == []
    return Cache.open(out)


def _corpus_ids(tok) -> list[int]:
    """The corpus tokenised (with the BOS a tokenizer adds) and joined with EOS, as a concat build packs it."""
    return [i for text in _texts() for i in tok(text)["input_ids"] + [tok.eos_token_id]]


def _max_error(q: S.Quantizer, lp: np.ndarray) -> np.ndarray:
    """The quantiser's largest error (its Quantizer.max_error) at each log-prob."""
    return np.array([q.max_error(-x) for x in lp.tolist()])


FORWARD_ATOL = 3e-4
"""The build's float32 forward (its batch, its chunked head) against the reference's one-row float32 forward:
under 1e-4 apart on one CPU, up to 1.3e-4 (log-probs) and 1.1e-4 (rest mass) on another (AMD EPYC)."""


@torch.no_grad()
def _check_against_reference(cache: Cache, teacher: Path, tok,
                             entropy_atol: float = 1 / 2048 + FORWARD_ATOL) -> np.ndarray:
    """Every stored position against a float64 log-softmax of the model's own forward over the tokenizer's
    ids (the padding columns dropped); returns all stored ids. Entropy within ``entropy_atol`` nats (default:
    half the stored code's 1/1024-nat step, and float32 rounding)."""
    V = len(tok)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    q, spec = cache.layout.quantizer, cache.manifest.targets
    batches = list(cache.iter_batches())
    assert np.concatenate([b.input_ids for b in batches]).tolist() == _corpus_ids(tok)[:cache.manifest.totals.tokens]
    top1 = torch.zeros(3, dtype=torch.float64)  # sampled: draws of the reference's top-1 id, expected, variance
    for batch in batches:
        for r in range(batch.num_rows):
            t0, t1, p0, p1 = *batch.row_offsets[r:r + 2], *batch.row_positions[r:r + 2]
            tokens = torch.from_numpy(batch.input_ids[t0:t1].astype(np.int64))
            at = torch.from_numpy(np.flatnonzero(batch.target_mask[t0:t1]))             # (P,) token indices
            lp = torch.log_softmax(model(tokens[None]).logits[0, at, :V].double(), -1)  # (P, V)
            e0, e1 = batch.target_offsets[p0], batch.target_offsets[p1]
            sizes = torch.from_numpy(np.diff(batch.target_offsets[p0:p1 + 1]))
            pos = torch.repeat_interleave(torch.arange(len(at)), sizes)                # (E,) entry -> position
            ids = torch.from_numpy(batch.target_ids[e0:e1].astype(np.int64))
            want = lp[pos, ids]                                                           # (E,)
            got = batch.target_logprobs[e0:e1]
            assert (np.abs(got - want.numpy()) <= _max_error(q, want.numpy()) + FORWARD_ATOL).all()
            stored = torch.zeros(len(at), dtype=torch.float64).index_add_(0, pos, want.exp())
            np.testing.assert_allclose(batch.rest_mass[p0:p1], 1 - stored.numpy(), atol=FORWARD_ATOL)
            np.testing.assert_allclose(batch.label_logprob[p0:p1], lp[torch.arange(len(at)), tokens[at + 1]],
                                       atol=1 / 2048 + FORWARD_ATOL)
            np.testing.assert_allclose(batch.entropy[p0:p1], -(lp.exp() * lp).sum(-1), atol=entropy_atol)
            assert all(len(set(ids[pos == j].tolist())) == n for j, n in enumerate(sizes.tolist()))  # distinct
            if cache.layout.sampled:
                counts = torch.from_numpy(batch.target_counts[e0:e1].astype(np.float64))
                assert (torch.zeros(len(at), dtype=torch.float64).index_add_(0, pos, counts) == spec.samples).all()
                best, p_best = lp.argmax(-1), lp.max(-1).values.exp()
                top1 += torch.stack([counts[ids == best[pos]].sum(), spec.samples * p_best.sum(),
                                     (spec.samples * p_best * (1 - p_best)).sum()])
            else:  # the K most likely ids: no other K ids hold more mass (float32 ties aside) ...
                assert (sizes == K).all()
                top = lp.topk(K + 1, dim=-1)
                assert (stored >= top.values[:, :K].exp().sum(-1) - 1e-7).all()
                clear = top.values[:, K - 1] - top.values[:, K] > 1e-4   # ... and exactly those where no tie is near
                assert clear.float().mean() > 0.9
                assert (ids.view(-1, K).sort(-1).values[clear] == top.indices[clear, :K].sort(-1).values).all()
    if cache.layout.sampled:  # the draws follow the teacher: its top-1 drawn as often as expected, within 4 sigma
        assert abs(top1[0] - top1[1]) <= 4 * top1[2].sqrt()
    return np.concatenate([b.target_ids for b in batches])


def _check_doc_decoder(cache: Cache, doc_rows) -> None:
    """The docs/FORMAT.md decoder (pyarrow + numpy only) reads the same 3-byte ids as the library."""
    rows = doc_rows(cache.path)
    lib = [(b, r) for b in cache.iter_batches() for r in range(b.num_rows)]
    for row, (b, r) in zip(rows, lib, strict=True):
        p0, p1 = b.row_positions[r], b.row_positions[r + 1]
        assert [ids for ids, _, _ in row["targets"]] == \
            [b.target_ids[b.target_offsets[p]:b.target_offsets[p + 1]].tolist() for p in range(p0, p1)]


def _train(cache: Cache, student: str, out: Path, fused: bool) -> list[dict]:
    """Two steps of two rows in cache order; the metrics of each step."""
    train(TrainOptions(cache=str(cache.path), student=student, out=str(out), progress=False, log_every=1,
                       device="cpu", fused_head=fused, chunk_size=40, kd=KDOptions(ce_weight=0.5),
                       schedule=ScheduleOptions(steps=2, batch_size=2, lr=1e-3, warmup_steps=1),
                       loader=LoaderOptions(shuffle=False)))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_qwen2_vocabulary_in_a_padded_head_builds_decodes_and_trains(qwen2, corpus, tmp_path, doc_rows):
    tok = AutoTokenizer.from_pretrained(qwen2)
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == QWEN2_TOKENS
    cache = _build(qwen2, corpus, tmp_path / "c", TargetSpec(kind="topk", k=K))
    m = cache.manifest
    assert m.layout.vocab_size == QWEN2_TOKENS == m.tokenizer.vocab_size and m.teacher.output_size == QWEN2_ROWS
    assert cache.layout.id_bytes == 3
    ids = _check_against_reference(cache, qwen2, tok)
    assert ids.max() < QWEN2_TOKENS                       # the 128 padding columns (the likeliest) never stored
    assert (ids > 0xFFFF).mean() > 0.4 and (ids > 0x1FFFF).any()
    inputs = np.concatenate([b.input_ids for b in cache.iter_batches()])
    assert inputs.max() == QWEN2_TOKENS - 1 and (inputs > 0xFFFF).mean() > 0.4
    with torch.no_grad():  # the padding columns would have been stored: they are the likeliest
        row = torch.from_numpy(inputs[None, :SEQ_LEN].astype(np.int64))
        logits = AutoModelForCausalLM.from_pretrained(qwen2)(row).logits[0]
    assert (logits.argmax(-1) >= QWEN2_TOKENS).float().mean() > 0.5
    _check_doc_decoder(cache, doc_rows)

    report = inspect_cache(cache.path)
    assert report["layout"]["vocab_size"] == QWEN2_TOKENS
    assert report["totals"]["target_entries"] == len(ids) == K * report["totals"]["target_positions"]
    view = show_row(cache.path, 0, top=3)
    first, batch = view.positions[0], next(iter(cache.iter_batches()))
    assert [a.token_id for a in first.top] == batch.target_ids[:3].tolist()
    assert first.top[0].text == tok.decode([first.top[0].token_id]) and first.top[0].text in format_text(view)

    # a student with Qwen 2's padded head (152,064 rows), beside the cache's tokenizer
    student = tmp_path / "student"
    torch.manual_seed(3)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=QWEN2_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(student)
    cache.tokenizer().save_pretrained(student)
    unfused = _train(cache, str(student), tmp_path / "unfused", fused=False)
    fused = _train(cache, str(student), tmp_path / "fused", fused=True)
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in unfused], rel=1e-4)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    assert trained.get_output_embeddings().weight.shape == (QWEN2_ROWS, 32)
    # step 1 is the untrained student, near-uniform over all its 152,064 columns: CE = log 152,064
    assert unfused[0]["ce"] == pytest.approx(math.log(QWEN2_ROWS), abs=0.05)


def test_gemma3_vocabulary_builds_decodes_and_trains(gemma3, corpus, tmp_path, doc_rows):
    tok = AutoTokenizer.from_pretrained(gemma3)
    assert len(tok) == GEMMA3_TOKENS
    cache = _build(gemma3, corpus, tmp_path / "c", TargetSpec(kind="topk", k=K))
    m = cache.manifest
    assert m.layout.vocab_size == GEMMA3_TOKENS == m.teacher.output_size and cache.layout.id_bytes == 3
    ids = _check_against_reference(cache, gemma3, tok)
    assert ids.max() < GEMMA3_TOKENS and (ids > 0x1FFFF).mean() > 0.3
    inputs = np.concatenate([b.input_ids for b in cache.iter_batches()])
    assert inputs.max() == GEMMA3_TOKENS - 1 and (inputs > 0x1FFFF).mean() > 0.3
    _check_doc_decoder(cache, doc_rows)

    sampled = _build(gemma3, corpus, tmp_path / "s", TargetSpec(kind="sample", k=None, samples=32, seed=5))
    assert sampled.layout.sampled and sampled.layout.id_bytes == 3
    # sampled targets take compute_targets' torch path (its entropy: test below)
    ids = _check_against_reference(sampled, gemma3, tok, entropy_atol=2e-3)
    assert ids.max() < GEMMA3_TOKENS and (ids > 0x1FFFF).mean() > 0.3
    _check_doc_decoder(sampled, doc_rows)

    unfused = _train(cache, "llama-tiny", tmp_path / "unfused", fused=False)   # a preset: 262,144 rows from the cache
    fused = _train(cache, "llama-tiny", tmp_path / "fused", fused=True)
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in unfused], rel=1e-4)


@torch.no_grad()
def test_torch_targets_entropy_is_within_the_stored_step_at_262k_ids(gemma3):
    """The torch path's entropy (GPU teachers, sampled targets) at 262,144 ids: the dot product over logits
    shifted by the row max (unshifted, it erred by up to 8e-3 nats here, beyond the 1/1024-nat code)."""
    tok = AutoTokenizer.from_pretrained(gemma3)
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    ids = torch.tensor(_corpus_ids(tok)[:SEQ_LEN])[None]
    logits = model(ids).logits                                               # (1, T, V)
    lp = torch.log_softmax(logits[0].double(), -1)
    want = -(lp.exp() * lp).sum(-1)[:-1]                                     # (T - 1,) every position but the last
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, -1] = False
    got = compute_targets(logits, ids, mask, TargetSpec(kind="topk", k=K), GEMMA3_TOKENS, backend="torch")
    assert np.abs(got.entropy - want.numpy()).max() <= 1 / 2048
