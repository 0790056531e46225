"""Cross-tokenizer distillation: a cache built with one tokenizer, seen through a student with another.

A cache stores the teacher's tokens of each row and, per target position, its distribution over the
teacher's ids. A student with its own tokenizer needs the row's text in its own tokens, and teacher targets
at its own positions. Three pieces, each with a hand-worked test (tests/student/test_cross_tokenizer.py):

* ``TokenBytes``: the bytes every id spells: byte-level BPE through GPT-2's byte table, SentencePiece's ``▁``
  (a space) and ``<0xNN>`` byte-fallback tokens, added tokens by their content; special tokens marked.
* ``TokenMap``: each teacher id -> the student id that spells the same bytes, or -1. Special tokens map by
  their content, else by role (the teacher's EOS to the student's EOS, then BOS, UNK, PAD). Keyed by both
  tokenizers' fingerprints and saved as JSON (``MAP_FILE``) beside the student.
* ``Aligner``: a row of teacher ids -> its text (the teacher tokens' bytes, special tokens as pieces of
  their own), re-tokenised with the student's tokenizer piece by piece, and the positions of both that
  predict a token starting at the same byte offset (the alignment rule, docs/cross_tokenizer.md).

``map_targets`` moves a position's stored targets into student ids: the mass of ids with no student
twin joins the rest bucket, so the sparse KD kernels apply unchanged. The collate step that uses all of
this is student.cross_batch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from teachercache.format.manifest import tokenizer_fingerprint
from teachercache.student.model import TrainError

CROSS_TOKENIZER_MODES = ("exact", "uld")
"""--cross-tokenizer: ``exact`` (teacher ids mapped to student ids by their bytes, the sparse KD losses)
or ``uld`` (universal logit distillation over sorted probabilities, student.uld)."""
MAP_FILE = "cross_tokenizer.json"
"""The teacher -> student id map and the alignment share of a sample of rows, in the student's output."""
MAP_FORMAT = "teachercache cross-tokenizer map"
ROLES = ("eos_token", "bos_token", "unk_token", "pad_token")
"""Special tokens with no same-content twin map by role, in this order of preference."""
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _gpt2_byte_decoder()


def _schemes(tokenizer) -> set[str]:
    """How the tokenizer's token strings spell bytes: {"bytelevel", "metaspace", "bytefallback"} or a subset,
    read from its tokenizer.json (pre-tokenizer, normalizer, decoder, model.byte_fallback)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:   # a slow tokenizer: SentencePiece ones carry their model
        return {"metaspace", "bytefallback"} if hasattr(tokenizer, "sp_model") else set()
    spec = json.loads(backend.to_str())
    found = {"bytefallback"} if (spec.get("model") or {}).get("byte_fallback") else set()

    def walk(node) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "ByteLevel":
                found.add("bytelevel")
            elif kind == "ByteFallback":
                found.add("bytefallback")
            elif kind == "Metaspace" or (kind == "Replace" and "▁" in json.dumps(node, ensure_ascii=False)):
                found.add("metaspace")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")])
    return found


@dataclass(frozen=True)
class TokenBytes:
    """The bytes each id of a tokenizer spells. V = the ids (``len(tokenizer)``, holes spell b"")."""

    spelled: tuple[bytes, ...]   # (V,) what each id spells; a special token its content
    special: np.ndarray          # (V,) bool, special tokens (BOS, EOS, ...): pieces of a row of their own
    fallback: np.ndarray         # (V,) bool, SentencePiece byte-fallback tokens <0xNN>
    text_lengths: np.ndarray     # (V,) int64, bytes of text per id: 0 for special tokens (bits per byte)
    span_lengths: np.ndarray     # (V,) int64, bytes an id covers in a row's coordinates: a special token
                                 # its content's length (at least 1), so it has a byte offset of its own

    @classmethod
    def of(cls, tokenizer) -> "TokenBytes":
        vocab = tokenizer.get_vocab()   # token -> id, added tokens included
        size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special_ids = {i for i, t in added.items() if getattr(t, "special", False)} | set(tokenizer.all_special_ids)
        schemes = _schemes(tokenizer)
        spelled = [b""] * size
        fallback = np.zeros(size, bool)
        for token, i in vocab.items():
            if i in added:
                spelled[i] = str(added[i]).encode()
                continue
            match = _BYTE_TOKEN.fullmatch(token) if "bytefallback" in schemes else None
            if match:
                spelled[i], fallback[i] = bytes([int(match.group(1), 16)]), True
            elif "bytelevel" in schemes and all(c in BYTE_DECODER for c in token):
                spelled[i] = bytes(BYTE_DECODER[c] for c in token)
            elif "metaspace" in schemes:
                spelled[i] = token.replace("▁", " ").encode()
            else:
                spelled[i] = token.encode()
        special = np.zeros(size, bool)
        special[[i for i in special_ids if 0 <= i < size]] = True
        lengths = np.array([len(s) for s in spelled], np.int64)
        return cls(spelled=tuple(spelled), special=special, fallback=fallback,
                   text_lengths=np.where(special, 0, lengths), span_lengths=np.where(special, np.maximum(lengths, 1),
                                                                                     lengths))

    def __len__(self) -> int:
        return len(self.spelled)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(V,) int64 bytes of text each id spells (0 for special tokens): the denominator of bits per byte."""
    return TokenBytes.of(tokenizer).text_lengths


# --------------------------------------------------------------------------------------------------------
# the id map


@dataclass(frozen=True)
class TokenMap:
    """Teacher id -> the student id spelling the same bytes (-1: none), for one pair of tokenizers."""

    teacher_fingerprint: str
    student_fingerprint: str
    student_ids: np.ndarray   # (V_teacher,) int64
    student_vocab: int

    @property
    def shared(self) -> int:
        """Teacher ids with a student twin."""
        return int((self.student_ids >= 0).sum())

    def to_json(self) -> dict:
        return {"format": MAP_FORMAT, "version": 1, "teacher_fingerprint": self.teacher_fingerprint,
                "student_fingerprint": self.student_fingerprint, "teacher_vocab": len(self.student_ids),
                "student_vocab": self.student_vocab, "shared": self.shared,
                "student_ids": self.student_ids.tolist()}

    @classmethod
    def from_json(cls, record: dict) -> "TokenMap":
        return cls(teacher_fingerprint=record["teacher_fingerprint"], student_fingerprint=record["student_fingerprint"],
                   student_ids=np.asarray(record["student_ids"], np.int64), student_vocab=int(record["student_vocab"]))


def build_token_map(teacher_tokenizer, student_tokenizer, teacher: TokenBytes | None = None,
                    student: TokenBytes | None = None) -> TokenMap:
    """Each teacher id -> the student id that spells the same bytes. Ordinary tokens match ordinary tokens
    (a byte-fallback <0xNN> only where no ordinary token spells that byte; the lowest id among equals);
    special tokens match a student token of the same content, else the student's token of the same role
    (EOS, BOS, UNK, PAD: ``ROLES``)."""
    teacher = teacher or TokenBytes.of(teacher_tokenizer)
    student = student or TokenBytes.of(student_tokenizer)
    ordinary: dict[bytes, int] = {}
    by_content: dict[bytes, int] = {}
    for i in sorted(range(len(student)), key=lambda i: (bool(student.fallback[i]), i)):
        table = by_content if student.special[i] else ordinary
        if student.spelled[i] and student.spelled[i] not in table:
            table[student.spelled[i]] = i
    added = getattr(student_tokenizer, "added_tokens_decoder", {}) or {}
    for i, token in added.items():   # a non-special added token may stand for a teacher's special one
        by_content.setdefault(str(token).encode(), i)
    ids = np.full(len(teacher), -1, np.int64)
    for i, spelled in enumerate(teacher.spelled):
        if spelled:
            ids[i] = (by_content if teacher.special[i] else ordinary).get(spelled, -1)
    for role in ROLES:
        t, s = getattr(teacher_tokenizer, f"{role}_id", None), getattr(student_tokenizer, f"{role}_id", None)
        if t is not None and s is not None and 0 <= t < len(ids) and ids[t] < 0:
            ids[t] = s
    return TokenMap(teacher_fingerprint=tokenizer_fingerprint(teacher_tokenizer),
                    student_fingerprint=tokenizer_fingerprint(student_tokenizer), student_ids=ids,
                    student_vocab=len(student))


def load_or_build_map(path: Path, teacher_tokenizer, student_tokenizer, write: bool = True) -> TokenMap:
    """The map stored at ``path`` when it was built for these two tokenizers (fingerprints compared), else a
    new one, written there (atomically) when ``write``."""
    want = (tokenizer_fingerprint(teacher_tokenizer), tokenizer_fingerprint(student_tokenizer))
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("format") == MAP_FORMAT and (record["teacher_fingerprint"],
                                                        record["student_fingerprint"]) == want:
                return TokenMap.from_json(record)
        except (OSError, ValueError, KeyError, TypeError):
            pass   # unreadable: rebuilt below
    token_map = build_token_map(teacher_tokenizer, student_tokenizer)
    if write:
        save_json(path, token_map.to_json())
    return token_map


def save_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# the targets in student ids


def map_targets(offsets: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, rest: np.ndarray,
                counts: np.ndarray | None, student_ids: np.ndarray):
    """Sparse targets of N positions (CSR: offsets (N+1,), ids/logprobs/counts (E,), rest (N,)) in teacher
    ids -> the same in student ids. A stored id with no student twin is dropped and its probability added to
    the position's rest mass (so stored + rest is unchanged); ids that map to one student id are merged
    (probabilities and draw counts summed). Returns (offsets, ids, logprobs float32, rest float32, counts)."""
    sizes = np.diff(offsets)
    pos = np.repeat(np.arange(len(sizes)), sizes)
    mapped = student_ids[ids]
    keep = mapped >= 0
    lost = np.bincount(pos[~keep], weights=np.exp(logprobs[~keep].astype(np.float64)), minlength=len(sizes))
    rest = np.minimum(rest.astype(np.float64) + lost, 1.0).astype(np.float32)
    pos, mapped, logprobs = pos[keep], mapped[keep], logprobs[keep].astype(np.float32)
    counts = None if counts is None else counts[keep]
    key = pos * (int(student_ids.max(initial=0)) + 1) + mapped
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    if len(first) < len(key):   # two teacher ids spell the same bytes: one student id, their mass summed
        order = np.argsort(first, kind="stable")       # keep the positions' first-occurrence order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        slot = rank[inverse.reshape(-1)]
        probs = np.zeros(len(first))
        np.add.at(probs, slot, np.exp(logprobs.astype(np.float64)))
        with np.errstate(divide="ignore"):
            logprobs = np.log(probs).astype(np.float32)
        if counts is not None:
            merged = np.zeros(len(first), counts.dtype)
            np.add.at(merged, slot, counts)
            counts = merged
        pos, mapped = pos[first[order]], mapped[first[order]]
    new_offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(np.bincount(pos, minlength=len(sizes)), out=new_offsets[1:])
    return new_offsets, mapped.astype(np.int64), logprobs, rest, counts


# --------------------------------------------------------------------------------------------------------
# alignment


@dataclass(frozen=True)
class RowAlignment:
    """One row in the student's tokens. S student tokens, T teacher tokens, P the teacher's target positions."""

    ids: np.ndarray              # (S,) int64 the student's tokens of the row's text
    starts: np.ndarray           # (S,) int64 byte offset of each in the row (the teacher tokens' bytes)
    target_mask: np.ndarray      # (S,) bool, position j predicts token j+1 and the teacher trains on that text
    teacher_index: np.ndarray    # (S,) int64, the teacher target (0..P-1, the row's CSR order) predicting a
                                 # token at the same byte offset as position j; -1: none (unaligned)
    teacher_offsets: np.ndarray  # (T+1,) int64 byte offset of each teacher token, then the row's end

    @property
    def aligned(self) -> np.ndarray:
        """(S,) bool: target positions with a teacher target at the same byte offset."""
        return self.teacher_index >= 0


def _utf8_spans(data: bytes, start: int, stop: int) -> list[tuple[int, int]]:
    """The valid UTF-8 stretches of data[start:stop] (a row cut mid-character at either end loses the cut
    character's bytes: the student's tokenizer reads text)."""
    spans, i = [], start
    while i < stop:
        try:
            data[i:stop].decode("utf-8")
            spans.append((i, stop))
            break
        except UnicodeDecodeError as e:
            if e.start > 0:
                spans.append((i, i + e.start))
            i += e.end
    return spans


class StudentEncoder:
    """The student's tokenizer as a function text -> ids, without special tokens (the row's own special
    tokens are mapped, not re-created). Uses the fast backend when there is one (no length warnings)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text, add_special_tokens=False)


class Aligner:
    """A row of teacher ids -> ``RowAlignment`` (see the module docstring and docs/cross_tokenizer.md).

    The row's text is the teacher tokens' bytes end to end; a special token covers its content's bytes.
    Runs of ordinary tokens are cut into valid UTF-8 stretches and each is tokenised by the student (the
    bytes of a character cut by the row's edge are dropped); a special token becomes the student token
    the map gives it, or nothing. Student position j predicts token j+1, which starts at byte b; it is a
    target when the teacher token covering byte b is one (its mask bit), and aligned with teacher target i
    when teacher token i+1 starts at the same byte b.
    """

    def __init__(self, teacher: TokenBytes, student: TokenBytes, token_map: TokenMap, encode):
        self.teacher, self.student, self.token_map, self.encode = teacher, student, token_map, encode

    @classmethod
    def of(cls, teacher_tokenizer, student_tokenizer, token_map: TokenMap | None = None) -> "Aligner":
        teacher, student = TokenBytes.of(teacher_tokenizer), TokenBytes.of(student_tokenizer)
        token_map = token_map or build_token_map(teacher_tokenizer, student_tokenizer, teacher, student)
        return cls(teacher, student, token_map, StudentEncoder(student_tokenizer))

    def align(self, ids, target_mask) -> RowAlignment:
        ids = np.asarray(ids, np.int64)
        mask = np.asarray(target_mask, bool)
        offsets = np.zeros(len(ids) + 1, np.int64)
        special = self.teacher.special[ids]
        spans = self.teacher.span_lengths[ids]
        np.cumsum(spans, out=offsets[1:])
        # the row's bytes; a special token's span is never read as text (placeholder bytes of its length)
        data = b"".join(b"\0" * int(n) if sp else self.teacher.spelled[i]
                        for i, sp, n in zip(ids.tolist(), special.tolist(), spans.tolist()))
        out_ids: list[int] = []
        out_starts: list[int] = []
        t = 0
        while t < len(ids):
            if special[t]:
                twin = int(self.token_map.student_ids[ids[t]])
                if twin >= 0:
                    out_ids.append(twin)
                    out_starts.append(int(offsets[t]))
                t += 1
                continue
            u = t + 1
            while u < len(ids) and not special[u]:
                u += 1
            for lo, hi in _utf8_spans(data, int(offsets[t]), int(offsets[u])):
                self._tokenize(data, lo, hi, out_ids, out_starts)
            t = u
        s_ids, starts = np.array(out_ids, np.int64), np.array(out_starts, np.int64)
        return self._positions(s_ids, starts, offsets, mask)

    def _tokenize(self, data: bytes, lo: int, hi: int, out_ids: list, out_starts: list) -> None:
        """The student's tokens of data[lo:hi] and their byte offsets, appended to the lists."""
        text = data[lo:hi]
        ids = self.encode(text.decode("utf-8"))
        pieces = [self.student.spelled[i] for i in ids]
        joined = b"".join(pieces)
        lead = 0
        if joined != text:
            if joined == b" " + text:   # SentencePiece's prefix space: not in the text, so no byte of it
                lead = 1
            else:
                raise TrainError(f"--cross-tokenizer: the student's tokenizer does not spell {text[:60]!r} back byte "
                                 f"for byte (its tokens spell {joined[:60]!r}): it normalises text or its token strings "
                                 "are not byte-level BPE, SentencePiece (▁, <0xNN>) or plain; byte offsets cannot be "
                                 "aligned. Use a student tokenizer without a normalizer")
        start = lo - lead
        for i, piece in zip(ids, pieces):
            end = start + len(piece)
            if end > lo:   # a token of the prefix space alone covers no byte of the text: dropped
                out_ids.append(int(i))
                out_starts.append(max(start, lo))
            start = end

    def _positions(self, s_ids, starts, offsets, mask) -> RowAlignment:
        n = len(s_ids)
        following = starts[1:]                                          # (S-1,) byte where token j+1 starts
        cover = np.searchsorted(offsets, following, side="right") - 1   # the teacher token holding that byte
        target = np.zeros(n, bool)
        if len(mask):
            target[:-1] = (cover >= 1) & mask[np.clip(cover - 1, 0, len(mask) - 1)]
        t_pos = np.flatnonzero(mask)
        t_start = offsets[t_pos + 1]                                    # (P,) where teacher target i's token starts
        k = np.searchsorted(t_start, following, side="right") - 1
        found = np.zeros(len(following), bool)
        if len(t_start):
            found = (k >= 0) & (t_start[np.maximum(k, 0)] == following)
        index = np.full(n, -1, np.int64)
        if n:
            index[:-1] = np.where(found & target[:-1], k, -1)
        return RowAlignment(ids=s_ids, starts=starts, target_mask=target, teacher_index=index,
                            teacher_offsets=offsets)


def alignment_share(rows: Iterable[dict], aligner: Aligner) -> dict:
    """How many positions the alignment keeps over ``rows`` (dicts with input_ids and target_mask): the
    student's target positions, the aligned ones, the teacher's target positions, and both shares."""
    student = aligned = teacher = count = 0
    for row in rows:
        a = aligner.align(row["input_ids"], row["target_mask"])
        student += int(a.target_mask.sum())
        aligned += int(a.aligned.sum())
        teacher += int(np.asarray(row["target_mask"]).sum())
        count += 1
    return {"rows": count, "student_positions": student, "teacher_positions": teacher, "aligned": aligned,
            "share": aligned / student if student else 0.0, "teacher_share": aligned / teacher if teacher else 0.0}
