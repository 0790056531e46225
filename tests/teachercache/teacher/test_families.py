"""Real teachers of every major family (tests/families.py builds them offline at toy size): each one's cache
verifies and equals a dense float64 computation from the model's own forward, and each one trains as a student
from that cache, with ``--fused-head`` giving the unfused losses or refused before any step where the family's
head is more than ``hidden @ head.T`` (a logit transform of teachercache.teacher.head, or a bias)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from families import FAMILIES, HEAD_ONLY, Family, head_rows, make_model, make_teacher, write_documents
from transformers import AutoModelForCausalLM, AutoTokenizer

from teachercache.student.model import TrainError, check_fusable
from teachercache.student.options import KDOptions, LoaderOptions, ScheduleOptions, TrainOptions
from teachercache.student.train import train
from teachercache.format.cache import Cache
from teachercache.format.manifest import TargetSpec
from teachercache.inspect.rows import iter_cache_rows
from teachercache.inspect.verify import verify_cache
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions, start_tokens
from teachercache.teacher.head import LOGIT_TRANSFORMS, apply_logit_transforms, logit_transforms

K = 8
SEQ_LEN = 40
TIE = 1e-5
"""Nats by which a stored id may fall short of the reference's k-th log-prob (float32 teacher vs float64 reference)."""


@dataclass
class Built:
    family: Family
    teacher: Path
    """The family's tokenizer and model, as ``--teacher`` takes them."""
    cache: Path
    notes: str
    """What the build printed on stderr."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Family name -> Built, each teacher made and its cache built once, on first use: top-8 over rows of 40
    tokens from five short documents (plain text, or chat for the families with a chat template)."""
    root = tmp_path_factory.mktemp("families")
    plain = write_documents(root / "plain.jsonl")
    chat = write_documents(root / "chat.jsonl", chat=True)
    done: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in done:
            family = FAMILIES[name]
            teacher = make_teacher(family, root / name / "teacher")
            data = DataOptions(paths=(str(chat if family.chat else plain),), seq_len=SEQ_LEN, packing=family.packing)
            notes = io.StringIO()
            with contextlib.redirect_stderr(notes):
                build_cache(BuildOptions(teacher=str(teacher), data=data, out=str(root / name / "cache"),
                                         targets=TargetSpec(kind="topk", k=K), batch_size=3,
                                         hidden_layers=family.hidden_layers, device="cpu", progress=False))
            done[name] = Built(family, teacher, root / name / "cache", notes.getvalue())
        return done[name]

    return get


def reference_model(built: Built):
    """The teacher again, in float64 (MoE experts through transformers' plain loop: its grouped kernel has no
    float64)."""
    extra = {"experts_implementation": "eager"} if built.family.experts else {}
    return AutoModelForCausalLM.from_pretrained(built.teacher, dtype=torch.float64, **extra).eval()


def quantiser_slack(cache: Cache, *logprobs: np.ndarray) -> np.ndarray:
    """The codec's largest error (half a step of the piece each -log p falls in, the coarser of the given
    values'), plus 1e-4 for float32 vs float64."""
    q = cache.layout.quantizer
    steps = [np.asarray(q.steps)[np.searchsorted(q.starts, -lp, side="right") - 1] for lp in logprobs]
    return np.maximum.reduce(steps) / 2 + 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cache_verifies_and_equals_the_dense_reference(built, name):
    """Row by row, the teacher's float64 forward over the tokenizer's ids (a padded head's extra columns
    dropped): the stored ids are its top-k (ties allowed), their log-probs within the codec's step, and the
    label log-prob, rest mass, entropy and stored hidden states are its own."""
    b = built(name)
    assert "LM head" not in b.notes                                   # the chunked head, not the fallback
    assert verify_cache(b.cache, deep=True) == []
    tok = AutoTokenizer.from_pretrained(b.teacher)
    V = len(tok)
    cache = Cache.open(b.cache)
    m = cache.manifest
    assert m.layout.vocab_size == m.tokenizer.vocab_size == V
    assert m.teacher.output_size == head_rows(b.family, V)           # padded rows recorded, never stored
    assert m.layout.hidden_layers == b.family.hidden_layers
    model = reference_model(b)
    rows = positions = tokens = bos_inside = 0
    bos = start_tokens(tok)                                           # a text document's BOS is no target
    for row in iter_cache_rows(cache):
        bos_inside += int(sum(row.input_ids[1:] == bos[0])) if bos else 0
        ids = torch.from_numpy(row.input_ids.astype(np.int64))[None]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        pos = row.positions                                           # (P,) token index of each target
        ref = torch.log_softmax(out.logits[0, pos, :V], -1).numpy()   # (P, V) over the tokenizer's ids only
        assert (row.ids < V).all() and (row.ids >= 0).all()
        assert (np.diff(row.offsets) == K).all()
        for j in range(len(pos)):
            e = row.entries(j)
            sid, slp, want = row.ids[e].astype(np.int64), row.logprobs[e].astype(np.float64), ref[j]
            kth = np.sort(want)[-K]
            assert len(set(sid.tolist())) == K and (want[sid] >= kth - TIE).all(), (name, row.index, j)
            assert (np.abs(slp - want[sid]) <= quantiser_slack(cache, want[sid], slp)).all(), (name, row.index, j)
            assert abs(row.rest_mass[j] - (1 - np.exp(want[sid]).sum())) <= 1e-3
            assert abs(row.label_logprob[j] - want[row.next_ids[j]]) <= 1e-3
            assert abs(row.entropy[j] - (-(np.exp(want) * want).sum())) <= 1e-3
        for layer in b.family.hidden_layers:                          # stored in bfloat16
            np.testing.assert_allclose(row.hidden[layer], out.hidden_states[layer][0, pos].numpy(),
                                       rtol=2**-7, atol=1e-5)
        rows, positions, tokens = rows + 1, positions + len(pos), tokens + len(row.input_ids)
    assert rows == m.totals.rows > 1 and positions > 50
    if b.family.chat:                                                 # targets at the assistant's tokens only
        assert positions < tokens - rows
    else:
        assert positions == tokens - rows - bos_inside


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if "sliding_window" in f.config])
def test_the_sliding_window_is_shorter_than_a_row(built, name):
    """The window the caches above were checked under bites: the teacher's last logits of a full row differ
    from those of the same weights with a window as wide as the row."""
    b = built(name)
    row = next(r for r in iter_cache_rows(Cache.open(b.cache)) if len(r.input_ids) == SEQ_LEN)
    ids = torch.from_numpy(row.input_ids.astype(np.int64))[None]
    with torch.no_grad():
        windowed = AutoModelForCausalLM.from_pretrained(b.teacher).eval()(ids).logits[0]
        whole = AutoModelForCausalLM.from_pretrained(b.teacher, sliding_window=SEQ_LEN).eval()(ids).logits[0]
    assert b.family.config["sliding_window"] < SEQ_LEN
    torch.testing.assert_close(windowed[:8], whole[:8])                 # inside the window: the same
    assert (windowed[-1] - whole[-1]).abs().max() > 0.1


@pytest.mark.parametrize("family", [f for f in (*FAMILIES.values(), *HEAD_ONLY.values())
                                    if f.fused_refusal in LOGIT_TRANSFORMS], ids=lambda f: f.name)
def test_logit_transforms_reproduce_the_forward_and_refuse_the_fused_head(family):
    """teachercache.teacher.head names each family's logit transform and applies it as the family's forward
    does (the head's product alone is not its logits); a student of the family is refused --fused-head."""
    model = make_model(family, 96).eval()
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[0]                      # (T, 96)
        out = model.base_model(input_ids=ids, use_cache=False)
        product = model.get_output_embeddings()(out.last_hidden_state[0])
    field = family.fused_refusal
    transforms = logit_transforms(model.config)
    assert transforms == pytest.approx({field: family.config[field]})
    assert (product - want).abs().max() > 0.1
    torch.testing.assert_close(apply_logit_transforms(product, transforms), want)
    with pytest.raises(TrainError, match=rf"--fused-head: the student's config sets {field}="):
        check_fusable(model)


def test_rows_start_with_bos_where_the_tokenizer_adds_it(built):
    """A teacher whose tokenizer prepends BOS to a text (Llama, Mistral, Gemma, Cohere) was trained on
    documents that start with it: the cache's first row starts with BOS, and in a concat cache so does every
    document after an EOS joiner."""
    missing = []
    for name, family in FAMILIES.items():
        if not family.style.add_bos:
            continue
        b = built(name)
        tok = AutoTokenizer.from_pretrained(b.teacher)
        assert tok("x")["input_ids"][0] == tok.bos_token_id                 # the family's tokenizer does add it
        ids = np.concatenate([r.input_ids for r in iter_cache_rows(Cache.open(b.cache))])
        starts = [0] + ([i + 1 for i in np.flatnonzero(ids[:-1] == tok.eos_token_id)]
                        if family.packing == "concat" else [])
        if any(ids[i] != tok.bos_token_id for i in starts):
            missing.append(f"{name} ({family.packing}, {'chat' if family.chat else 'text'})")
    assert not missing, f"documents without the BOS their tokenizer adds: {', '.join(missing)}"


def _train(b: Built, student: Path, out: Path, **kw):
    return train(TrainOptions(cache=str(b.cache), student=str(student), out=str(out), progress=False, log_every=1,
                              device="cpu", schedule=ScheduleOptions(steps=3, batch_size=2, lr=1e-3, warmup_steps=1),
                              kd=KDOptions(ce_weight=0.5), loader=LoaderOptions(shuffle_buffer=8), **kw))


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_as_a_student_and_its_head_fuses_or_is_refused(built, name, tmp_path):
    """A model of the family (seeded apart from the teacher, so the KD term is not ~0) saved with the cache's
    tokenizer, as the student: it trains; ``--fused-head`` gives the same losses, or is refused before any step
    naming what the chunked head cannot apply."""
    b = built(name)
    student = make_teacher(b.family, tmp_path / "student", seed=1)
    rows = AutoModelForCausalLM.from_pretrained(student).get_output_embeddings().weight.shape[0]
    assert rows == head_rows(b.family, Cache.open(b.cache).layout.vocab_size)   # Qwen's: wider than the cache
    plain = _train(b, student, tmp_path / "plain")
    losses = _losses(plain.out)
    assert len(losses) == 3 and all(np.isfinite(losses)) and min(losses) > 0.1
    if b.family.fused_refusal is None:
        fused = _train(b, student, tmp_path / "fused", fused_head=True, chunk_size=7)
        assert _losses(fused.out) == pytest.approx(losses, rel=1e-4)
    else:
        with pytest.raises(TrainError, match=rf"--fused-head.*{b.family.fused_refusal}"):
            _train(b, student, tmp_path / "fused", fused_head=True, chunk_size=7)
        assert not (tmp_path / "fused" / "model.safetensors").exists()
        assert not (tmp_path / "fused" / "metrics.jsonl").exists()
